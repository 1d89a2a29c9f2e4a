"""Evaluation and calibration data: small subsets shipped with the package, the full sets from a data directory
(`MAMBAQUANT_DATA`, else `../shared/data` beside the working directory or the repository) when present."""

import os
from pathlib import Path

PACKAGE_DATA = Path(__file__).parent


def shared_data_dir() -> Path | None:
    candidates = [os.environ.get("MAMBAQUANT_DATA")]
    candidates += [str(base / ".." / "shared" / "data") for base in (Path.cwd(), PACKAGE_DATA.parents[1])]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


def tinyshakespeare_validation() -> bytes:
    """The last 10 % of Tiny Shakespeare (111,540 bytes); the first 90 % is the training split."""
    return (PACKAGE_DATA / "tinyshakespeare_val.txt").read_bytes()
