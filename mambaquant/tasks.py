"""What a model is measured with and what it takes: its evaluation protocols (`task_for`, `tasks_for`) and the
inputs it accepts (`checked_inputs`). Below both calibration and evaluation, which ask it."""

import torch
from torch import nn

from .data import TYPESEG_LABELS
from .errors import InputError
from .runtime import MambaLM, MambaTagger, VisionMamba
from .zoo import ZOO, embedded_name

TASKS = ("bytes", "wikitext2", "lambada", "cifar10", "typeseg")
NEOX_VOCAB = 50277  # GPT-NeoX-20B's tokenizer; the state-spaces models pad it to 50280


def tasks_for(model: nn.Module, source: str) -> list[str]:
    """Every protocol that applies to the model, its main one first."""
    if isinstance(model, MambaLM) and model.config.vocab_size >= NEOX_VOCAB:
        return ["wikitext2", "lambada"]
    return [task_for(model, source)]


def task_for(model: nn.Module, source: str) -> str:
    """The protocol a model is measured with: from the zoo card, else from the model's shape."""
    if embedded_name(source):
        return ZOO[embedded_name(source)].task
    if isinstance(model, MambaLM) and 256 <= model.config.vocab_size < 512:
        return "bytes"
    if isinstance(model, MambaLM) and model.config.vocab_size >= NEOX_VOCAB:
        return "wikitext2"
    if isinstance(model, VisionMamba) and (model.config.img_size, model.config.num_classes) == (32, 10):
        return "cifar10"
    if isinstance(model, MambaTagger) and model.config.num_classes == len(TYPESEG_LABELS):
        return "typeseg"
    raise InputError(
        f"{source}: no evaluation protocol available for this model yet (supported: byte-level language models, "
        "GPT-NeoX-tokenised language models, CIFAR-10 vision models (32x32, 10 classes), typeseg-style taggers); "
        "evaluate it on your own labelled data (eval_data=, --eval-data)"
    )


def checked_inputs(model: nn.Module, inputs: torch.Tensor, what: str = "calibration") -> torch.Tensor:
    """Inputs of the kind, shape and range the model takes (its own `check_input` where it has one), finite; `what`
    they are for, in messages."""
    if len(inputs) == 0:
        raise InputError(f"the {what} set is empty; expected at least one input")
    if not inputs.is_floating_point() and inputs.dim() == 2 and inputs.shape[1] == 0:
        raise InputError(f"{what} sequences are empty; expected a length of at least one token")
    config = model.config
    if hasattr(model, "check_input"):
        try:
            model.check_input(inputs)
        except InputError as e:
            raise InputError(f"{what} inputs: {e}") from None
    else:  # a language model: token ids
        if inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool or inputs.dim() != 2:
            raise InputError(f"{what} inputs must be an integer tensor of token ids of shape (N, L); got "
                             f"{inputs.dtype} of shape {tuple(inputs.shape)}")
        if inputs.min() < 0 or inputs.max() >= config.vocab_size:
            raise InputError(f"{what} token ids must lie in 0..{config.vocab_size - 1} (the model's vocabulary); "
                             f"got {inputs.min().item()}..{inputs.max().item()}")
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise InputError(f"{what} inputs contain NaN or Inf; expected finite values")
    return inputs.float() if inputs.is_floating_point() else inputs.long()
