"""Calibration batches, always from training data (never from the split a model is evaluated on), seeded, and the
same for every method so results are comparable."""

import torch
from torch import nn

from .data import PACKAGE_DATA, cifar10, normalise_images
from .errors import InputError

TRAIN_TEXT = PACKAGE_DATA / "tinyshakespeare_train_head.txt"  # first 64 KiB of Tiny Shakespeare's training split
TYPESEG_CALIBRATION = PACKAGE_DATA / "typeseg_calibration"


def calibration_batches(model: nn.Module, task: str, samples: int = 32, seed: int = 0,
                        batch_size: int = 8) -> list[torch.Tensor]:
    """`samples` inputs for a model evaluated with protocol `task`, in batches."""
    if samples < 1:
        raise InputError(f"calibration needs at least one sample, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    if task == "bytes":
        data = torch.frombuffer(bytearray(TRAIN_TEXT.read_bytes()), dtype=torch.uint8).long()
        starts = torch.randint(0, len(data) - 256, (samples,), generator=generator)
        inputs = torch.stack([data[s : s + 256] for s in starts.tolist()])
    elif task == "cifar10":
        images, _, _ = cifar10("train")
        order = torch.randperm(len(images), generator=generator)[:samples]
        inputs = normalise_images(images[order.numpy()])
    elif task == "typeseg":
        from .loaders.typeseg import typeseg_tokens

        tokens = torch.cat([typeseg_tokens(p.read_bytes()) for p in sorted(TYPESEG_CALIBRATION.glob("*"))
                            if p.name != "SOURCES.md"])
        starts = torch.randint(0, len(tokens) - 512, (samples,), generator=generator)
        inputs = torch.stack([tokens[s : s + 512] for s in starts.tolist()])
    else:
        raise InputError(f"no calibration data for task {task!r}")
    return list(inputs.split(batch_size))
