"""glibc's malloc, tuned for large short-lived temporaries.

By default glibc serves every block above a (dynamic) threshold of 128 KiB to 32 MiB with its own mmap and hands it
back with munmap when freed, and trims the heap top above 128 KiB: each activation-sized temporary of a CPU forward
pass is then zero-filled by the kernel page by page again, and most of a run's time goes to page faults (issue 17:
`mambaquant eval vim-cifar10 --eval-samples 500` spent 8.3 of its 13.0 s in the kernel). `tune_allocator` keeps
freed memory in the process instead: mmap only above 32 MiB (a fixed threshold), no trimming below 2 GiB of free
heap top, and the heap grown 1 GiB (of address space; pages become resident when touched) at a time. Measured with
benchmarks/allocator.py (BENCHMARKS.md): on that command 1.5x less wall time and 9x less system time, for a peak
resident memory 1.3x higher (freed blocks are reused rather than returned, and the heap fragments); with a 256 MiB
pad most of the page faults stayed. Resident memory after a peak stays near it instead of shrinking back.

Applied once when mambaquant is imported, on Linux with glibc. Not applied when the environment already sets one
of glibc's own MALLOC_*_ variables (the user's choice wins), or with MAMBAQUANT_MALLOC=default."""

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 1 << 30))
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def glibc(function: str):
    """`function` of the C library the interpreter is linked with, where that is glibc on Linux; None otherwise."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(process, "gnu_get_libc_version"):  # glibc's parameters only
        return None
    return getattr(process, function, None)


def tune_allocator() -> bool:
    """Set glibc's malloc parameters (see the module's docstring); True when they were set."""
    if os.environ.get("MAMBAQUANT_MALLOC") == "default" or any(name in os.environ for name in USER_VARIABLES):
        return False
    mallopt = glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)


def release_free_memory() -> bool:
    """Hand the heap's free memory back to the system (glibc's malloc_trim): a streamed walk calls it after each
    block, so that what it keeps resident is what is alive, not the last block's freed temporaries."""
    malloc_trim = glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))
