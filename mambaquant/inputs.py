"""Files the user gives us, checked before they are read: regular files only (a FIFO, a device or a directory is
refused by its kind, never waited on), sizes bounded before anything is read or allocated, directory walks bounded
and kept off the filesystem root, and text checked to be text before a tokenizer sees it. (`outputs` is the other
side: what we write.)"""

import os
import stat
from pathlib import Path

from .errors import InputError
from .memory import check_allocation
from .schema import display

MAX_WALK_ENTRIES = 20_000  # files and folders one walk visits before it gives up: a folder of tasks or images
KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
         stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFLNK: "a broken symbolic link"}


def kind_of(mode: int) -> str:
    return KINDS.get(stat.S_IFMT(mode), "not a regular file")


def status(path: Path, kind: str, what: str) -> os.stat_result:
    """`path`'s metadata (symbolic links followed), or one line: missing or unreadable, and `what` was expected."""
    try:
        return path.stat()
    except FileNotFoundError:
        raise InputError(f"{display(path)}: no such {kind}; expected {what}") from None
    except OSError as e:
        raise InputError(f"{display(path)}: cannot be read ({e.strerror}); expected {what}") from None


def regular_file(path, what: str, max_bytes: int | None = None) -> Path:
    """`path` if it is a regular file (symbolic links followed) of at most `max_bytes`; one line naming `what` it
    should be otherwise. Only the file's metadata is read: a FIFO is never opened."""
    path = Path(path)
    info = status(path, "file", what)
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{display(path)}: is {kind_of(info.st_mode)}; expected {what} (a regular file)")
    if max_bytes is not None and info.st_size > max_bytes:
        raise InputError(f"{display(path)}: {info.st_size:,} bytes; expected {what} of at most {max_bytes:,} bytes")
    return path


def directory(path, what: str) -> Path:
    path = Path(path)
    info = status(path, "directory", what)
    if not stat.S_ISDIR(info.st_mode):
        raise InputError(f"{display(path)}: is {kind_of(info.st_mode)}; expected {what} (a directory)")
    return path


def read_bytes(path, what: str, max_bytes: int | None = None, copies: float = 1.0) -> bytes:
    """The content of a regular file, its size checked first against `max_bytes` and, `copies` times, against the
    memory available."""
    path = regular_file(path, what, max_bytes)
    size = path.stat().st_size
    check_allocation(size * copies, f"reading {display(path)} ({what})")
    with open(path, "rb") as file:
        return file.read(size + 1)[:size] if size else file.read()


def text_of(data: bytes, where: str, what: str) -> str:
    """`data` as text for a tokenizer: UTF-8 without NUL bytes (a binary file is refused, not tokenised)."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise InputError(f"{where}: a NUL byte at offset {nul:,}: binary data, not text; expected {what} "
                         "(UTF-8 text)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte {e.start:,}); expected {what} (UTF-8 text)") from None


def read_text(path, what: str, max_bytes: int | None = None, copies: float = 1.0) -> str:
    return text_of(read_bytes(path, what, max_bytes, copies), display(path), what)


def walk(root, what: str, suffixes: tuple[str, ...], file_what: str, max_depth: int | None = None,
         max_entries: int = MAX_WALK_ENTRIES) -> list[Path]:
    """The files under `root` (at most `max_depth` folders down) whose names end in one of `suffixes`, sorted:
    hidden and cache folders skipped, each folder visited once however symbolic links loop, at most `max_entries`
    entries visited (one line instead of a walk through a whole filesystem), the filesystem root refused. A match
    that is not a regular file is refused by its kind (as `file_what`)."""
    root = directory(root, what)
    if root.resolve() == Path(root.resolve().anchor):
        raise InputError(f"{display(root)}: the filesystem root; expected {what} (a folder of its own)")
    found, visited, seen = [], 0, set()
    for folder, folders, files in os.walk(root, followlinks=True):
        info = os.stat(folder)
        depth = len(Path(folder).relative_to(root).parts)
        if (info.st_dev, info.st_ino) in seen:
            folders[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        keep = max_depth is None or depth < max_depth
        folders[:] = sorted(f for f in folders if keep and not f.startswith(".") and f != "__pycache__")
        visited += len(folders) + len(files)
        if visited > max_entries:
            raise InputError(f"{display(root)}: more than {max_entries:,} files and folders; expected {what} "
                             "(a folder of its own, not a tree to search)")
        found += [Path(folder) / name for name in files if name.lower().endswith(suffixes)]
    return [regular_file(path, file_what) for path in sorted(found)]
