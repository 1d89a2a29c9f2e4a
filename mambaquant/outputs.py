"""Outputs written whole or not at all, and never over anything this tool did not write.

A directory is filled under a hidden staging name beside its target, with a manifest (`MANIFEST`) listing every file
and its size, then moved into place. `overwrite` replaces only a directory whose manifest says this tool wrote it and
which holds nothing else; never the working directory, one of its parents, the home directory, `/`, or a source being
read. The old directory is swapped out atomically (renameat2's RENAME_EXCHANGE where the filesystem has it, else
renamed aside first) and deleted only once the new one is in place, so a kill at any moment leaves one of the two
whole; what a kill leaves behind is a hidden staging directory, which the next write beside it removes.

Report files are written to a temporary name and renamed over the target, except where the target is not a regular
file (a device, a FIFO, /dev/stdout): those are written through.
"""

import ctypes
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import InputError
from .schema import display
from .version import __version__

MANIFEST = ".mambaquant-output.json"
STAGING = re.compile(r"^\.(?P<name>.+)\.mambaquant-(?:staging|old)-(?P<pid>\d+)-[^/]*$")
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def output_problem(path: Path, error: OSError) -> InputError:
    return InputError(f"cannot write {path}: {error.strerror or error}")


def writable_parent(path: Path) -> Path:
    """The nearest existing parent of `path`, which must be a writable directory."""
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{path}: {parent} is not a directory; expected a path inside a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: no permission to write in {parent}")
    return parent


def check_free_space(path: Path, nbytes: int) -> None:
    try:
        free = shutil.disk_usage(writable_parent(path)).free
    except OSError:
        return
    if nbytes > free:
        raise InputError(f"{path}: needs about {nbytes / 2**20:.0f} MiB on disk, and {free / 2**20:.0f} MiB is free")


def protected_paths(sources: Iterable) -> dict[Path, str]:
    """Directories that must never be replaced, and what each is: the working directory and its parents, the home
    directory, and every source being read with the directories holding it."""
    cwd = Path.cwd().resolve()
    protected = {parent: "a parent of the working directory" for parent in cwd.parents}
    protected[Path.home().resolve()] = "the home directory"
    protected[cwd] = "the working directory"
    for source in sources:
        if isinstance(source, (str, os.PathLike)) and str(source) and Path(source).exists():
            resolved = Path(source).resolve()
            protected.update({parent: f"a directory holding the source {source}" for parent in resolved.parents
                              if parent not in protected})
            protected[resolved] = f"the source {source}"
    return protected


def foreign_files(directory: Path, limit: int = 4) -> list[str]:
    """Up to `limit` files of `directory` that its manifest does not list with their size."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        listed = manifest["files"] if manifest.get("written_by") == "mambaquant" else None
    except (OSError, ValueError, AttributeError, TypeError, KeyError, RecursionError):
        listed = None
    if not isinstance(listed, dict):
        return [f"no {MANIFEST} manifest"]
    foreign = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory).as_posix()
        if relative == MANIFEST or (path.is_dir() and not path.is_symlink()):
            continue
        if path.is_symlink() or not path.is_file() or listed.get(relative) != path.stat().st_size:
            foreign.append(relative)
            if len(foreign) == limit:
                break
    return sorted(foreign)


def check_output_dir(directory, overwrite: bool = False, sources: Iterable = (), expected_bytes: int = 0) -> Path:
    """Refuse, before any work, an output directory that may not be written or replaced."""
    if not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
        raise InputError(f"the output directory is {display(repr(directory))}; expected a directory path")
    directory = Path(directory)
    if directory.is_symlink():
        raise InputError(f"{directory}: is a symbolic link; expected a new directory, or one mambaquant wrote")
    if directory.exists():
        if not directory.is_dir():
            raise InputError(f"{directory}: exists and is not a directory; expected a directory path")
        if not overwrite:
            raise InputError(f"{directory}: already exists; pass --overwrite (overwrite=True) to replace a "
                             "directory mambaquant wrote")
        resolved = directory.resolve()
        what = protected_paths(sources).get(resolved)
        if what:
            raise InputError(f"{directory}: is {what}, and is never replaced; expected a directory of its own")
        foreign = foreign_files(resolved)
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise InputError(f"{directory}: holds files mambaquant did not write ({shown}); refusing to replace it, "
                             "expected a directory mambaquant wrote")
    writable_parent(directory)
    if expected_bytes:
        check_free_space(directory, expected_bytes)
    return directory


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(parent: Path) -> None:
    """Remove the staging directories that killed runs left in `parent`; restore an old output a kill left aside."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = STAGING.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink() or process_alive(int(match["pid"])):
            continue
        target = parent / match["name"]
        if ".mambaquant-old-" in entry.name and not target.exists():
            os.rename(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically; False where the system cannot (then the caller renames in two steps)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_manifest(staging: Path, kind: str) -> None:
    files = {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
    manifest = {"written_by": "mambaquant", "version": __version__, "kind": kind, "files": files}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def write_atomic_dir(directory, write: Callable[[Path], None], overwrite: bool = False, kind: str = "checkpoint",
                     sources: Iterable = ()) -> Path:
    """`write(staging)` fills a hidden staging directory beside `directory`, which then takes its place (see the
    module's docstring for what may be replaced and how)."""
    directory = check_output_dir(directory, overwrite, sources)
    try:
        directory.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_problem(directory, e) from None
    parent = directory.absolute().parent
    clean_stale_staging(parent)
    prefix = f".{directory.name}.mambaquant-staging-{os.getpid()}-"
    try:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as e:
        raise output_problem(directory, e) from None
    aside = None
    try:
        write(staging)
        write_manifest(staging, kind)
        make_readable(staging)
        if directory.exists():
            check_output_dir(directory, overwrite, sources)  # still ours, just before it goes
            if not exchange(staging, directory):
                aside = parent / f".{directory.name}.mambaquant-old-{os.getpid()}-{staging.name[len(prefix):]}"
                os.rename(directory, aside)
                os.rename(staging, directory)
                staging, aside = aside, None
        else:
            os.rename(staging, directory)
            staging = None
    except OSError as e:
        raise output_problem(directory, e) from None
    finally:
        if aside is not None and not directory.exists():
            os.rename(aside, directory)  # interrupted between the two renames: the old output goes back
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)  # the unfinished new output, or the replaced old one
    return directory


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(directory: Path) -> None:
    """mkdtemp makes a private directory; give the result the permissions of any new directory and file."""
    mask = umask()
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_through(path: Path) -> bool:
    """Whether `path` is written in place: a device, a FIFO, a socket, or anything under /dev or /proc."""
    if str(path.absolute()).startswith(("/dev/", "/proc/")):
        return True
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def check_output_file(path) -> Path:
    """Refuse, before any work, a report path that cannot be written."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise InputError(f"the output file name is {display(repr(path))}; expected a file path")
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; expected a file path")
    if write_through(path):
        if not os.access(path, os.W_OK):
            raise InputError(f"{path}: no permission to write it")
        return path
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{path}: no permission to write it")
    if not path.absolute().parent.is_dir():
        raise InputError(f"{path}: {path.absolute().parent} is not an existing directory; expected a file path in one")
    writable_parent(path)
    return path


def write_atomic(path, text: str) -> None:
    """Write a whole text file or nothing; a symbolic link is followed, a non-regular target written through."""
    path = check_output_file(path)
    if write_through(path):
        try:
            with open(path, "w") as file:
                file.write(text)
        except OSError as e:
            raise output_problem(path, e) from None
        return
    write_atomic_file(path, lambda temporary: temporary.write_text(text))


def write_atomic_file(path, write: Callable[[Path], None]) -> Path:
    """A whole file or nothing: `write` fills a temporary file beside `path` (a symbolic link is followed), which is
    then renamed over it; an interruption or an error leaves no temporary file."""
    path = Path(path)
    try:
        target = Path(os.path.realpath(path))
        mode = stat.S_IMODE(os.stat(target).st_mode) if target.exists() else 0o666 & ~umask()
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(handle)
        try:
            write(Path(temporary))
            os.chmod(temporary, mode)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise output_problem(path, e) from None
    return path
