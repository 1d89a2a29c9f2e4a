"""Evaluation protocols. Each result names its protocol so a number is never read without its convention."""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import InputError
from ..runtime import MambaLM
from .text import bits_per_byte


@dataclass
class Result:
    model: str
    metric: str
    value: float
    higher_is_better: bool
    protocol: str
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def task_for(model: nn.Module, source: str) -> str:
    from ..zoo import ZOO

    if source in ZOO:
        return ZOO[source].task
    if isinstance(model, MambaLM) and 256 <= model.config.vocab_size < 512:
        return "bytes"
    raise InputError(
        f"{source}: no evaluation protocol available for this model yet "
        "(supported now: byte-level language models, vocabulary 256 to 511)"
    )


@torch.no_grad()
def evaluate(model: nn.Module, source: str, max_samples: int | None = None) -> Result:
    task = task_for(model, source)
    if task == "bytes":
        from ..data import tinyshakespeare_validation

        bpb, windows = bits_per_byte(model, tinyshakespeare_validation(), max_windows=max_samples)
        protocol = "Tiny Shakespeare validation (last 10 %), non-overlapping 256-byte windows, bits per byte"
        return Result(source, "bits_per_byte", bpb, False, protocol, windows)
    raise InputError(f"unknown evaluation task {task!r}")
