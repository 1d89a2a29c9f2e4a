"""Outputs written whole or not at all: into a temporary name beside the target, renamed into place at the end, so
an error or an interruption leaves nothing that looks complete."""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import InputError


def write_atomic(path: str | Path, text: str) -> None:
    """Write a whole text file or nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; expected a file path")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: directory not found")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomic_dir(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(staging)` fills a temporary directory beside `directory`, which then replaces it."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(staging)
        make_readable(staging)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def make_readable(directory: Path) -> None:
    """mkdtemp makes a private directory; give the result the permissions of any new directory and file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
