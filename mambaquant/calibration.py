"""Calibration inputs, always from training data (never from a split a model is evaluated on), seeded, and the
same for every method so that results compare."""

from pathlib import Path

import torch
from torch import nn

from .data import PACKAGE_DATA, cifar10, normalise_images
from .errors import InputError

TRAIN_TEXT = PACKAGE_DATA / "tinyshakespeare_train_head.txt"  # first 64 KiB of Tiny Shakespeare's training split
TYPESEG_CALIBRATION = PACKAGE_DATA / "typeseg_calibration"
CALIBRATION_SETS = {  # name -> (what it is, the evaluation tasks it serves by default)
    "shakespeare-train": ("random windows from Tiny Shakespeare's training split (bytes, or the model's tokens)",
                          ("bytes", "wikitext2", "lambada")),
    "cifar10-train": ("random CIFAR-10 training images", ("cifar10",)),
    "typeseg-calibration": ("random 512-byte windows from real files outside the typeseg evaluation corpus",
                            ("typeseg",)),
}
DEFAULT_SET = {task: name for name, (_, tasks) in CALIBRATION_SETS.items() for task in tasks}


def text_windows(tokens: torch.Tensor, samples: int, length: int, generator: torch.Generator, name) -> torch.Tensor:
    if length >= len(tokens):
        raise InputError(f"calibration length {length} is too long for the {len(tokens)} tokens of {name}; "
                         f"expected --calib-len below {len(tokens)}")
    starts = torch.randint(0, len(tokens) - length, (samples,), generator=generator).tolist()
    return torch.stack([tokens[s : s + length] for s in starts])


def calibration_inputs(name: str, samples: int, length: int | None = None, seed: int = 0,
                       tokenizer=None) -> torch.Tensor:
    """`samples` inputs from the set `name`, or from a text file when `name` is a path (training text the user
    brings, e.g. WikiText-2's train split). Text is tokenised with `tokenizer` (default: bytes)."""
    if samples < 1:
        raise InputError(f"calibration needs at least one sample, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    if name == "cifar10-train":
        images, _, _ = cifar10("train")
        return normalise_images(images[torch.randperm(len(images), generator=generator)[:samples].numpy()])
    if name == "typeseg-calibration":
        from .loaders.typeseg import typeseg_tokens

        files = sorted(p for p in TYPESEG_CALIBRATION.iterdir() if p.name != "SOURCES.md")
        tokens = torch.cat([typeseg_tokens(p.read_bytes()) for p in files])
        return text_windows(tokens, samples, length or 512, generator, name)
    if name == "shakespeare-train":
        path = TRAIN_TEXT
    elif Path(name).is_file():
        path = Path(name)
    else:
        raise InputError(f"unknown calibration set {name!r}; expected one of {', '.join(CALIBRATION_SETS)} "
                         "or the path of a text file")
    if path.stat().st_size == 0:
        raise InputError(f"{name}: the calibration text is empty; expected training text")
    if tokenizer is None:
        tokens = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    else:
        tokens = torch.tensor(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")))
    return text_windows(tokens, samples, length or 256, generator, name)


def resolve_calibration(model: nn.Module, source: str, calib, samples: int = 32, length: int | None = None,
                        seed: int = 0, batch_size: int = 8, tokenizer: str | None = None) -> list[torch.Tensor]:
    """`calib`: a tensor of inputs, a calibration set name, a text file, or None for the model's default set.
    Text for a model with a BPE vocabulary is tokenised with `tokenizer` (default: GPT-NeoX's)."""
    from .evaluation import NEOX_VOCAB

    if isinstance(calib, torch.Tensor):
        inputs = calib
    else:
        if calib is None:
            from .evaluation import task_for

            task = task_for(model, source)
            if task not in DEFAULT_SET:
                raise InputError(f"{source}: no default calibration set; pass calib= (a tensor or a set name)")
            calib = DEFAULT_SET[task]
        bpe = None
        if getattr(model.config, "vocab_size", 0) >= NEOX_VOCAB:
            from .tokenizer import tokenizer_for

            bpe = tokenizer_for(model.config.vocab_size, tokenizer)
        inputs = calibration_inputs(str(calib), samples, length, seed, bpe)
    if len(inputs) == 0:
        raise InputError("the calibration set is empty; expected at least one input")
    return list(inputs.split(batch_size))
