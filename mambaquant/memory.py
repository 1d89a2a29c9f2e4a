"""Sizes checked before anything is allocated: a request larger than the memory this machine has left is refused
with one line saying how much was asked for and how much there is."""

import os
from pathlib import Path

from .errors import InputError

GiB = 1024**3


def available_bytes() -> int:
    """Memory available to a new allocation: MemAvailable, bounded by a cgroup limit where one is set."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = 1 << 62
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            used_path = path.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
            try:
                used = int(Path(used_path).read_text().strip())
            except (OSError, ValueError):
                used = 0
            available = min(available, max(int(limit) - used, 0))
    return available


def describe(nbytes: float) -> str:
    if nbytes >= GiB:
        return f"{nbytes / GiB:.1f} GiB"
    return f"{nbytes / 1024**2:.0f} MiB"


def check_allocation(nbytes: float, what: str, hint: str = "") -> None:
    """Refuse `what` if it needs more than the memory available now (`hint` ends the line: what to do instead)."""
    available = available_bytes()
    if nbytes > available:
        raise InputError(f"{what} needs {describe(nbytes)} of memory, and {describe(available)} is available{hint}")
