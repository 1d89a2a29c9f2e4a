"""Evaluation and calibration data: small subsets shipped with the package, the full sets from a data directory
(`MAMBAQUANT_DATA`, else `../shared/data` beside the working directory or the repository) when present."""

import io
import os
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

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


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TYPESEG_LABELS = (
    "php", "csharp", "javascript_typescript", "go", "sql", "rust", "yaml", "ruby", "python", "java", "c_family",
    "json", "css", "html", "text", "csv", "shell", "powershell", "visual_basic", "dockerfile", "dart",
    "gettext_catalog", "kotlin", "markdown", "restructuredtext", "scala", "swift", "tex", "xml", "svg",
    "encoding_hex", "encoding_base64", "encoding_base32", "encoding_base58", "encoding_base85",
)  # typeseg 0.2.7 data/manifest.json, in head order


def read_cifar10_tar(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """JPEGs named <split>/<class>/NNNN.jpg in a (gzipped) tar -> uint8 images (N, 32, 32, 3) and labels (N,),
    sorted by class, then file name."""
    from PIL import Image

    entries = []
    with tarfile.open(path) as archive:
        for member in archive:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == split and parts[1] in CIFAR10_CLASSES:
                entries.append((CIFAR10_CLASSES.index(parts[1]), parts[2], archive.extractfile(member).read()))
    entries.sort(key=lambda e: (e[0], e[1]))
    images = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for _, _, data in entries])
    return images, np.array([label for label, _, _ in entries], dtype=np.int64)


@lru_cache(maxsize=2)
def cifar10(split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """CIFAR-10 `train` or `test`: the full split from the data directory when present, else the subset shipped
    with the package (2,000 test images, 200 per class; 500 train images, 50 per class, for calibration).
    Returns images, labels and a description of what was read. Decoded once per process: callers must not modify the arrays."""
    data = shared_data_dir()
    full = data / "cifar10" / "cifar10-jpeg.tar.gz" if data else None
    if full is not None and full.is_file():
        images, labels = read_cifar10_tar(full, split)
        description = f"CIFAR-10 {split} split, all {len(labels)} images"
    else:
        images, labels = read_cifar10_tar(PACKAGE_DATA / f"cifar10_{split}_subset.tar.gz", split)
        description = f"CIFAR-10 {split} subset shipped with mambaquant ({len(labels)} images, stratified)"
    return images, labels, description


def normalise_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) with the CIFAR-10 channel mean and std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
