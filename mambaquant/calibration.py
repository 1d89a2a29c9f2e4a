"""Calibration inputs, always from training data (never from a split a model is evaluated on), seeded, and the
same for every method so that results compare."""

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .data import PACKAGE_DATA, cifar10, normalise_images
from .errors import InputError
from .memory import available_bytes, check_allocation, describe

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
IMAGE_SETS = ("cifar10-train",)
MAX_SAMPLES = 65536
ACTIVATION_COPIES = 4  # a block's inputs and outputs over the whole set, and a batch's temporaries


def text_windows(tokens: torch.Tensor, samples: int, length: int, generator: torch.Generator, name,
                 check_size: Callable[[int, int], None]) -> torch.Tensor:
    if length >= len(tokens):
        raise InputError(f"calibration length {length} is too long for the {len(tokens)} tokens of {name}; "
                         f"expected --calib-len below {len(tokens)}")
    check_size(samples, length)
    starts = torch.randint(0, len(tokens) - length, (samples,), generator=generator).tolist()
    return torch.stack([tokens[s : s + length] for s in starts])


def calibration_inputs(name: str, samples: int, length: int | None = None, seed: int = 0, tokenizer=None,
                       check_size: Callable[[int, int], None] = lambda samples, positions: None) -> torch.Tensor:
    """`samples` inputs from the set `name`, or from a text file when `name` is a path (training text the user
    brings, e.g. WikiText-2's train split). Text is tokenised with `tokenizer` (default: bytes). `check_size(samples,
    positions)` may refuse the set before it is allocated."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"calibration needs a positive integer number of samples, got {samples!r}")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise InputError(f"the calibration length must be a positive integer, got {length!r}")
    generator = torch.Generator().manual_seed(seed)
    if name == "cifar10-train":
        images, _, description = cifar10("train")
        if samples > len(images):
            raise InputError(f"cifar10-train has {len(images)} images here ({description}); expected --calib-samples "
                             f"at most {len(images)}")
        check_size(samples, images.shape[1] * images.shape[2])
        return normalise_images(images[torch.randperm(len(images), generator=generator)[:samples].numpy()])
    if name == "typeseg-calibration":
        from .loaders.typeseg import typeseg_tokens

        files = sorted(p for p in TYPESEG_CALIBRATION.iterdir() if p.name != "SOURCES.md")
        tokens = torch.cat([typeseg_tokens(p.read_bytes()) for p in files])
        return text_windows(tokens, samples, length or 512, generator, name, check_size)
    if name == "shakespeare-train":
        path = TRAIN_TEXT
    elif Path(name).is_file():
        path = Path(name)
    elif Path(name).exists():
        raise InputError(f"{name}: not a regular file; expected a calibration set name or a training text file")
    else:
        raise InputError(f"unknown calibration set {name!r}; expected one of {', '.join(CALIBRATION_SETS)} "
                         "or the path of a text file")
    if path.stat().st_size == 0:
        raise InputError(f"{name}: the calibration text is empty; expected training text")
    check_allocation(path.stat().st_size * 10, f"the calibration text {name} (bytes and their token ids)")
    if tokenizer is None:
        tokens = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    else:
        tokens = torch.tensor(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")))
    return text_windows(tokens, samples, length or 256, generator, name, check_size)


def resolve_calibration(model: nn.Module, source: str, calib, samples: int = 32, length: int | None = None,
                        seed: int = 0, batch_size: int = 8, tokenizer: str | None = None) -> list[torch.Tensor]:
    """`calib`: a tensor of inputs, a calibration set name, a text file, or None for the model's default set.
    Text for a model with a BPE vocabulary is tokenised with `tokenizer` (default: GPT-NeoX's)."""
    from .evaluation import NEOX_VOCAB

    if isinstance(calib, torch.Tensor):
        inputs = calib
    elif calib is not None and not isinstance(calib, (str, Path)):
        raise InputError(f"calib must be a tensor of inputs, a calibration set name or a text file path; got a "
                         f"{type(calib).__name__}")
    else:
        if calib is None:
            from .evaluation import task_for

            task = task_for(model, source)
            if task not in DEFAULT_SET:
                raise InputError(f"{source}: no default calibration set; pass calib= (a tensor or a set name)")
            calib = DEFAULT_SET[task]
        check_modality(model, str(calib))
        bpe = None
        if getattr(model.config, "vocab_size", 0) >= NEOX_VOCAB:
            from .tokenizer import tokenizer_for

            bpe = tokenizer_for(model.config.vocab_size, tokenizer)
        inputs = calibration_inputs(str(calib), samples, length, seed, bpe, partial(check_calibration_size, model))
    return list(checked_inputs(model, inputs).split(batch_size))


def is_vision(model: nn.Module) -> bool:
    return hasattr(model.config, "img_size")


def check_modality(model: nn.Module, name: str) -> None:
    kind = "a vision model" if is_vision(model) else "a token model (language model or tagger)"
    if is_vision(model) and name not in IMAGE_SETS:
        raise InputError(f"calibration set {name!r} is text, and the model is {kind}; expected an image set "
                         f"({', '.join(IMAGE_SETS)})")
    if not is_vision(model) and name in IMAGE_SETS:
        raise InputError(f"calibration set {name!r} is images, and the model is {kind}; expected a text set "
                         f"(shakespeare-train, typeseg-calibration) or a training text file")


def check_calibration_size(model: nn.Module, samples: int, positions: int) -> None:
    """Refuse, before it is allocated, a calibration set whose activations would not fit in memory."""
    tokens = model.config.num_patches + 1 if is_vision(model) else positions
    per_sample = tokens * model.config.d_model * 4 * ACTIVATION_COPIES
    largest = max(1, min(MAX_SAMPLES, available_bytes() // per_sample))
    if samples > largest:
        raise InputError(f"{samples} calibration samples of {tokens} positions need {describe(samples * per_sample)} "
                         f"of activations ({describe(available_bytes())} available); expected --calib-samples at most "
                         f"{largest}")


def checked_inputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Calibration tensors of the kind, shape and range the model takes."""
    if len(inputs) == 0:
        raise InputError("the calibration set is empty; expected at least one input")
    config = model.config
    if is_vision(model):
        expected = (config.in_chans, config.img_size, config.img_size)
        if not inputs.is_floating_point() or inputs.dim() != 4 or tuple(inputs.shape[1:]) != expected:
            raise InputError(f"calibration images must be a float tensor of shape (N, {', '.join(map(str, expected))})"
                             f"; got {inputs.dtype} of shape {tuple(inputs.shape)}")
        if not torch.isfinite(inputs).all():
            raise InputError("calibration images contain NaN or Inf; expected finite pixel values")
        return inputs.float()
    if inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool or inputs.dim() != 2:
        raise InputError(f"calibration inputs must be an integer tensor of token ids of shape (N, L); got "
                         f"{inputs.dtype} of shape {tuple(inputs.shape)}")
    if inputs.shape[1] == 0:
        raise InputError("calibration sequences are empty; expected a length of at least one token")
    if inputs.min() < 0 or inputs.max() >= config.vocab_size:
        raise InputError(f"calibration token ids must lie in 0..{config.vocab_size - 1} (the model's vocabulary); "
                         f"got {inputs.min().item()}..{inputs.max().item()}")
    return inputs.long()
