"""The user's own data: inputs (calibration) and labelled inputs (evaluation) from tensors, Datasets, iterables,
files (.pt, .npz, .npy, .safetensors) and ImageFolder-style directories, with top-1 accuracy on them."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..data import normalise_images
from ..errors import InputError
from ..memory import check_allocation
from ..tasks import checked_inputs
from .vision import top1_and_agreement

FILES = (".pt", ".pth", ".npz", ".npy", ".safetensors")
IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
ARRAYS = (torch.Tensor, np.ndarray)
KINDS = ("a tensor of inputs, a tuple (inputs, labels), a Dataset or an iterable of tensors or (input, label) pairs, "
         f"or a {', '.join(FILES)} file or a directory of class subdirectories of images")


@dataclass
class UserData:
    inputs: torch.Tensor
    labels: torch.Tensor | None  # None where the data has none
    description: str  # where it came from, for messages and protocol lines
    left_out: bool = False  # whether inputs beyond the limit asked for were left out


def is_user_data(source) -> bool:
    """Whether `source` is user data (rather than a calibration set name or a training text file)."""
    if source is None:
        return False
    if not isinstance(source, (str, Path)):
        return True
    return Path(source).suffix.lower() in FILES or Path(source).is_dir()


def user_data(source, limit: int | None = None, what: str = "calib") -> UserData:
    """The first `limit` inputs (and labels) of `source`: see KINDS. `what` names the argument in messages."""
    if isinstance(source, UserData):
        inputs, labels, description, left_out = source.inputs, source.labels, source.description, source.left_out
    elif isinstance(source, (str, Path)) and Path(source).is_dir():
        return image_folder(Path(source), limit)
    else:
        description = str(source) if isinstance(source, (str, Path)) else f"a {type(source).__name__}"
        loaded = read_file(Path(source)) if isinstance(source, (str, Path)) else source
        inputs, labels = split(loaded, description, what, limit)
        left_out = False
    if labels is not None and len(labels) != len(inputs):
        raise InputError(f"{description}: {len(inputs)} inputs and {len(labels)} labels; expected one label per input")
    cut = lambda t: None if t is None else t[:limit]  # noqa: E731
    return UserData(cut(inputs), cut(labels), description, left_out or (limit is not None and len(inputs) > limit))


def split(source, description: str, what: str, limit: int | None = None):
    """(inputs, labels or None) of a tensor, a dict with "inputs" (and "labels") or its only array, a tuple
    (inputs, labels), or a Dataset or iterable of inputs or (input, label) pairs (up to one past `limit`)."""
    if isinstance(source, dict):
        if "inputs" not in source and (len(source) != 1 or "labels" in source):
            raise InputError(f"{description}: no 'inputs' among {', '.join(map(str, source)) or 'no arrays'}; "
                             "expected an 'inputs' array (and 'labels' to evaluate)")
        labels = source.get("labels")
        inputs = source["inputs"] if "inputs" in source else next(iter(source.values()))
        return numeric(inputs, description), None if labels is None else numeric(labels, description)
    if isinstance(source, ARRAYS):
        return numeric(source, description), None
    if isinstance(source, tuple) and len(source) == 2 and all(isinstance(t, ARRAYS) for t in source):
        return numeric(source[0], description), numeric(source[1], description)
    return gather(source, description, what, limit)


def numeric(value, description: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise InputError(f"{description}: a non-numeric array ({array.dtype}); expected numbers")
    return torch.from_numpy(array.astype(np.int64) if array.dtype.kind in "iu" else array)


def gather(source, description: str, what: str, limit: int | None):
    """Inputs (and labels) of a Dataset or iterable, stacked; a DataLoader's batches are joined."""
    batched = isinstance(source, DataLoader)
    if isinstance(source, Dataset) and not isinstance(source, IterableDataset) and hasattr(source, "__len__"):
        items = map(source.__getitem__, range(len(source)))
    else:
        try:
            items = iter(source)
        except TypeError:
            raise InputError(f"{what} must be {KINDS}; got {description}") from None
    inputs, labels, count = [], [], 0
    for item in items:
        x, y = item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None)
        if not isinstance(x, ARRAYS):
            raise InputError(f"{what} must be {KINDS}; got {description} with {type(x).__name__} items")
        x, y = numeric(x, description), None if y is None else numeric(y, description)
        inputs.append(x if batched else x[None])
        labels.append(y if batched or y is None else y[None])
        count += len(inputs[-1])
        if len(inputs) == 1 and (limit or hasattr(source, "__len__")):  # the first item tells the size of the rest
            expected, shape = limit or len(source) * len(inputs[0]), tuple(inputs[0].shape[1:])
            check_allocation(inputs[0][0].nbytes * expected, f"{description}: {expected} inputs of shape {shape}")
        if limit is not None and count > limit:
            break
    if not inputs:
        raise InputError(f"{description} is empty; expected at least one input")
    shapes = sorted({tuple(x.shape[1:]) for x in inputs})
    if len(shapes) > 1:
        raise InputError(f"{description}: inputs of different shapes {shapes[0]} and {shapes[1]}; expected one shape")
    return torch.cat(inputs), None if any(y is None for y in labels) else torch.cat(labels)


def read_file(path: Path):
    """What a .pt/.pth file holds (tensors, dicts, lists: weights only), or the arrays of .npz/.npy/.safetensors;
    a regular file only, and an array's size, from its header, checked against the memory left before it is read."""
    from ..inputs import regular_file

    if path.suffix.lower() not in FILES:
        raise InputError(f"{path}: unknown file type; expected {', '.join(FILES)} or a directory of class "
                         "subdirectories of images")
    regular_file(path, f"a {path.suffix} file of inputs")
    check_allocation(2 * path.stat().st_size, f"reading {path}")
    try:
        if path.suffix.lower() in (".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=True)
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        arrays = np.load(path, allow_pickle=False, mmap_mode="r")
        if not hasattr(arrays, "files"):
            return np.array(arrays)
        with arrays:
            check_allocation(sum(info.file_size for info in arrays.zip.infolist()), f"decompressing {path}")
            return {name: arrays[name] for name in arrays.files}
    except (InputError, MemoryError):
        raise
    except Exception as e:  # each reader has its own errors for a truncated or foreign file
        raise InputError(f"{path}: not a readable {path.suffix} file of numeric arrays ({e})") from None


def image_folder(root: Path, limit: int | None) -> UserData:
    """ImageFolder layout: one subdirectory of images per class, classes numbered in sorted order; images as
    float (N, 3, H, W) with the CIFAR-10 normalisation of the built-in vision pipeline. The folder is walked with
    bounds (`inputs.walk`), every image is a regular file, and each image's size is read from its header and checked
    (one size for all, all of them in memory) before any is decoded."""
    from PIL import Image

    from ..inputs import walk

    found = walk(root, "an image folder (one subdirectory of images per class)", IMAGES, "an image file",
                 max_depth=1)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root}: no class subdirectories; expected one subdirectory of images per class")
    label_of = {name: label for label, name in enumerate(classes)}
    files = sorted((label_of[path.parent.name], path) for path in found if path.parent != root)
    if not files:
        raise InputError(f"{root}: no images ({', '.join(IMAGES)}) in its {len(classes)} class subdirectories")
    chosen = files[:limit]
    images, size = [], None
    for _, path in chosen:
        try:
            with Image.open(path) as image:
                if size is None:
                    size = image.size
                    check_allocation(size[0] * size[1] * 3 * 17 * len(chosen),  # uint8 RGB, its float copies
                                     f"{len(chosen)} images of {size[0]}x{size[1]} pixels from {root}")
                if image.size != size:
                    raise InputError(f"{path}: {image.size[0]}x{image.size[1]} pixels, and {chosen[0][1]} "
                                     f"{size[0]}x{size[1]}; expected images of one size")
                images.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"{path}: not a readable image ({e})") from None
    labels = torch.tensor([label for label, _ in chosen])
    description = f"{root} ({len(classes)} classes)"
    return UserData(normalise_images(np.stack(images)), labels, description, len(chosen) < len(files))


@torch.no_grad()
def user_top1(model, data: UserData, reference=None, batch_size: int = 64):
    """Top-1 % of `model`'s argmax against the labels: one per input for a classifier (outputs (N, classes)), one
    per token for a per-token model (outputs (N, L, classes)); with `reference`, the % of predictions equal to its.
    Returns (top1, agreement or None, count, protocol)."""
    if data.labels is None:
        raise InputError(f"{data.description}: no labels; expected labelled inputs ((inputs, labels), (input, label) "
                         "pairs, 'inputs' and 'labels' arrays, or a directory of class subdirectories)")
    try:
        inputs = checked_inputs(model, data.inputs, "evaluation")
    except InputError as e:
        raise InputError(f"{data.description}: {e}") from None
    labels, shape = data.labels, model(inputs[:1]).shape  # (1, classes) or (1, L, classes)
    expected = (len(inputs), *shape[1:-1])
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.shape != expected:
        per = "token" if len(shape) == 3 else "input"
        raise InputError(f"{data.description}: labels must be integer class indices of shape {tuple(expected)} (one "
                         f"per {per}); got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= shape[-1]:
        raise InputError(f"{data.description}: labels must lie in 0..{shape[-1] - 1} (the model's {shape[-1]} "
                         f"classes); got {labels.min().item()}..{labels.max().item()}")
    top1, agreement = top1_and_agreement(model, reference, inputs, labels, batch_size)
    tokens = f" ({labels.numel()} tokens), per-token" if len(shape) == 3 else ","
    protocol = (f"user data: {'the first ' if data.left_out else ''}{len(inputs)} labelled inputs from "
                f"{data.description}{tokens} top-1 %")
    return top1, agreement, len(inputs), protocol
