"""Calibration inputs, always from training data (never from a split a model is evaluated on), seeded, and the
same for every method so that results compare."""

import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .data import PACKAGE_DATA, cifar10, normalise_images
from .errors import InputError
from .inputs import read_bytes, text_of
from .memory import available_bytes, describe
from .tasks import NEOX_VOCAB, checked_inputs, task_for

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
ACTIVATION_COPIES = 4  # a block's inputs and outputs over the whole set, and copies of them
MIXER_TEMPORARIES = 8  # floats per position and in_proj output channel inside a mixer, for one batch


def text_windows(tokens: torch.Tensor, samples: int, length: int, generator: torch.Generator, name,
                 check_size: Callable[[int, int], None]) -> torch.Tensor:
    if length >= len(tokens):
        raise InputError(f"calibration length {length} is too long for the {len(tokens)} tokens of {name}; "
                         f"expected --calib-len below {len(tokens)}")
    check_size(samples, length)
    starts = torch.randint(0, len(tokens) - length, (samples,), generator=generator).tolist()
    return torch.stack([tokens[s : s + length] for s in starts])


def check_samples(samples) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"calibration needs a positive integer number of samples, got {samples!r}")


def calibration_inputs(name: str, samples: int, length: int | None = None, seed: int = 0, tokenizer=None,
                       check_size: Callable[[int, int], None] = lambda samples, positions: None) -> torch.Tensor:
    """`samples` inputs from the set `name`, or from a text file when `name` is a path (training text the user
    brings, e.g. WikiText-2's train split). Text is tokenised with `tokenizer` (default: bytes). `check_size(samples,
    positions)` may refuse the set before it is allocated."""
    check_samples(samples)
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
    elif os.path.lexists(name):
        path = Path(name)
    else:
        raise InputError(f"unknown calibration set {name!r}; expected one of {', '.join(CALIBRATION_SETS)} "
                         "or the path of a text file")
    # bytes, their int64 token ids; for a BPE tokenizer the text and its token list as well
    data = read_bytes(path, "a calibration set name or a training text file", copies=10 if tokenizer is None else 30)
    if not data:
        raise InputError(f"{name}: the calibration text is empty; expected training text")
    if tokenizer is None:
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    else:
        tokens = torch.tensor(tokenizer.encode(text_of(data, name, "training text")))
    return text_windows(tokens, samples, length or 256, generator, name, check_size)


def resolve_calibration(model: nn.Module, source: str, calib, samples: int = 32, length: int | None = None,
                        seed: int = 0, batch_size: int = 8, tokenizer: str | None = None) -> list[torch.Tensor]:
    """`calib`: a tensor of inputs, a tuple (inputs, labels), a Dataset or iterable of inputs or (input, label)
    pairs, a .pt/.npz/.npy/.safetensors file of inputs or an ImageFolder-style directory (labels are ignored; the
    first `samples` inputs are taken), a calibration set name, a text file, or None for the model's default set.
    Text for a model with a BPE vocabulary is tokenised with `tokenizer` (default: the tokenizer.json the model
    directory or hub snapshot `source` ships, else GPT-NeoX's)."""
    from .evaluation.user_data import is_user_data

    if is_user_data(calib):
        inputs = user_inputs(model, calib, samples, batch_size)
    else:
        if calib is None:
            try:
                task = task_for(model, source)
            except InputError:  # no protocol: no default set either
                task = None
            if task not in DEFAULT_SET:
                raise InputError(f"{source}: no default calibration set; pass calib= (--calib): a tensor, a Dataset, "
                                 "a file of inputs or a set name")
            calib = DEFAULT_SET[task]
        check_modality(model, str(calib))
        bpe = None
        if getattr(model.config, "vocab_size", 0) >= NEOX_VOCAB:
            from .tokenizer import own_tokenizer, tokenizer_for

            bpe = tokenizer_for(model.config.vocab_size, tokenizer or own_tokenizer(source))
        inputs = calibration_inputs(str(calib), samples, length, seed, bpe,
                                    partial(check_calibration_size, model, batch_size=batch_size))
        inputs = checked_inputs(model, inputs)
    return list(inputs.split(batch_size))


def user_inputs(model: nn.Module, calib, samples: int, batch_size: int = 8) -> torch.Tensor:
    """The first `samples` of the user's own inputs (a warning says so when more were given), checked against the
    model and, their activations, against the memory left."""
    from .evaluation.user_data import user_data

    check_samples(samples)
    data = user_data(calib, samples, "calib")
    if data.left_out:
        warnings.warn(f"calibration takes the first {len(data.inputs)} inputs of {data.description} "
                      "(calib_samples, --calib-samples)")
    inputs = checked_inputs(model, data.inputs)
    check_calibration_size(model, len(inputs), inputs.shape[1] if inputs.dim() > 1 else 1, batch_size)
    return inputs


def is_vision(model: nn.Module) -> bool:
    return hasattr(model.config, "img_size") and getattr(model.config, "stem", "patch") == "patch"


def check_modality(model: nn.Module, name: str) -> None:
    kind = "a vision model" if is_vision(model) else "a token model (language model or tagger)"
    if is_vision(model) and name not in IMAGE_SETS:
        raise InputError(f"calibration set {name!r} is text, and the model is {kind}; expected an image set "
                         f"({', '.join(IMAGE_SETS)})")
    if not is_vision(model) and name in IMAGE_SETS:
        raise InputError(f"calibration set {name!r} is images, and the model is {kind}; expected a text set "
                         f"(shakespeare-train, typeseg-calibration) or a training text file")


def check_calibration_size(model: nn.Module, samples: int, positions: int, batch_size: int = 8) -> None:
    """Refuse, before it is allocated, a calibration set whose activations would not fit in memory: the block inputs
    and outputs held over the whole set, and a batch's temporaries inside a mixer (measured: 5.6 and 6.7 times the
    in_proj width per position for Mamba-1 and Mamba-2 blocks, with every method)."""
    tokens = getattr(model.config, "positions", 0) or (model.config.num_patches + 1 if is_vision(model) else positions)
    widths = [m.in_proj.out_features for m in model.modules() if isinstance(getattr(m, "in_proj", None), nn.Linear)]
    held = tokens * model.config.d_model * 4 * ACTIVATION_COPIES
    batch = min(samples, batch_size) * tokens * max(widths, default=4 * model.config.d_model) * 4 * MIXER_TEMPORARIES
    available = available_bytes()
    largest = max(0, min(MAX_SAMPLES, (available - batch) // held))
    if samples > largest:
        needed = samples * held + batch
        expected = (f"--calib-samples at most {largest}" if largest else
                    f"calibration inputs shorter than {tokens:,} positions (--calib-len for text)")
        raise InputError(f"{samples} calibration samples of {tokens:,} positions need {describe(needed)} of "
                         f"activations ({describe(available)} available); expected {expected}")
