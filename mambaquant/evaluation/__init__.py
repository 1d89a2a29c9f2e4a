"""Evaluation protocols. Each result names its protocol so a number is never read without its convention."""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import InputError
from ..runtime import MambaLM, MambaTagger, VisionMamba
from .tagging import TYPESEG_LABELS, typeseg_accuracy
from .text import bits_per_byte
from .vision import cifar10_top1


@dataclass
class Result:
    model: str
    metric: str
    value: float
    higher_is_better: bool
    protocol: str
    samples: int
    agreement: float | None = None  # % of predictions equal to the reference model's, where one was given

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def task_for(model: nn.Module, source: str) -> str:
    """The protocol a model is measured with: from the zoo card, else from the model's shape."""
    from ..zoo import ZOO

    if source in ZOO:
        return ZOO[source].task
    if isinstance(model, MambaLM) and 256 <= model.config.vocab_size < 512:
        return "bytes"
    if isinstance(model, VisionMamba) and (model.config.img_size, model.config.num_classes) == (32, 10):
        return "cifar10"
    if isinstance(model, MambaTagger) and model.config.num_classes == len(TYPESEG_LABELS):
        return "typeseg"
    raise InputError(
        f"{source}: no evaluation protocol available for this model yet (supported: byte-level language models, "
        "CIFAR-10 vision models (32x32, 10 classes), typeseg-style taggers)"
    )


@torch.no_grad()
def evaluate(model: nn.Module, source: str, max_samples: int | None = None, reference: nn.Module | None = None):
    """Measure `model` with its protocol; `max_samples` limits it to a fixed subset; `reference` (the
    full-precision model) adds the agreement of the predictions where the protocol has discrete predictions."""
    task = task_for(model, source)
    if task == "bytes":
        from ..data import tinyshakespeare_validation

        bpb, windows = bits_per_byte(model, tinyshakespeare_validation(), max_windows=max_samples)
        protocol = "Tiny Shakespeare validation (last 10 %), non-overlapping 256-byte windows, bits per byte"
        return Result(source, "bits_per_byte", bpb, False, protocol, windows)
    if task == "cifar10":
        accuracy, agreement, count, protocol = cifar10_top1(model, max_samples, reference)
        return Result(source, "top1", accuracy, True, protocol, count, agreement)
    if task == "typeseg":
        accuracy, agreement, count, protocol = typeseg_accuracy(model, max_samples, reference)
        return Result(source, "byte_accuracy", accuracy, True, protocol, count, agreement)
    raise InputError(f"unknown evaluation task {task!r}")
