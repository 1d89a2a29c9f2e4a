"""Calibration inputs, always from training data (never from a split a model is evaluated on), seeded, and the
same for every method so that results compare."""

import torch
from torch import nn

from .data import PACKAGE_DATA, cifar10, normalise_images
from .errors import InputError

TRAIN_TEXT = PACKAGE_DATA / "tinyshakespeare_train_head.txt"  # first 64 KiB of Tiny Shakespeare's training split
TYPESEG_CALIBRATION = PACKAGE_DATA / "typeseg_calibration"
CALIBRATION_SETS = {  # name -> (what it is, the evaluation task it serves)
    "shakespeare-train": ("random 256-byte windows from Tiny Shakespeare's training split", "bytes"),
    "cifar10-train": ("random CIFAR-10 training images", "cifar10"),
    "typeseg-calibration": ("random 512-byte windows from real files outside the typeseg evaluation corpus", "typeseg"),
}
DEFAULT_SET = {task: name for name, (_, task) in CALIBRATION_SETS.items()}


def calibration_inputs(name: str, samples: int, length: int | None = None, seed: int = 0) -> torch.Tensor:
    if name not in CALIBRATION_SETS:
        raise InputError(f"unknown calibration set {name!r}; expected one of {', '.join(CALIBRATION_SETS)}")
    if samples < 1:
        raise InputError(f"calibration needs at least one sample, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    if name == "cifar10-train":
        images, _, _ = cifar10("train")
        return normalise_images(images[torch.randperm(len(images), generator=generator)[:samples].numpy()])
    if name == "shakespeare-train":
        tokens, length = torch.frombuffer(bytearray(TRAIN_TEXT.read_bytes()), dtype=torch.uint8).long(), length or 256
    else:
        from .loaders.typeseg import typeseg_tokens

        files = sorted(p for p in TYPESEG_CALIBRATION.iterdir() if p.name != "SOURCES.md")
        tokens, length = torch.cat([typeseg_tokens(p.read_bytes()) for p in files]), length or 512
    if length >= len(tokens):
        raise InputError(f"calibration length {length} exceeds the {len(tokens)} tokens of {name}")
    starts = torch.randint(0, len(tokens) - length, (samples,), generator=generator).tolist()
    return torch.stack([tokens[s : s + length] for s in starts])


def resolve_calibration(model: nn.Module, source: str, calib, samples: int = 32, length: int | None = None,
                        seed: int = 0, batch_size: int = 8) -> list[torch.Tensor]:
    """`calib`: a tensor of inputs, a calibration set name, or None for the model's default set."""
    if isinstance(calib, torch.Tensor):
        inputs = calib
    else:
        if calib is None:
            from .evaluation import task_for

            task = task_for(model, source)
            if task not in DEFAULT_SET:
                raise InputError(f"{source}: no default calibration set; pass calib= (a tensor or a set name)")
            calib = DEFAULT_SET[task]
        inputs = calibration_inputs(calib, samples, length, seed)
    if len(inputs) == 0:
        raise InputError("the calibration set is empty; expected at least one input")
    return list(inputs.split(batch_size))
