"""Reading tensors from checkpoint files and assigning them to a model, with one clear error for every mismatch."""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import InputError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors, .bin/.pt/.pth file or a sharded index.json -> {name: tensor}. Nested `model`/`state_dict`
    entries (as in Vim's released checkpoints) are unwrapped."""
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise InputError(f"{path}: not a valid weight index (expected JSON with a 'weight_map'): {e}") from None
        tensors = {}
        for shard in shards:
            tensors.update(read_tensors(path.parent / shard))
        return tensors
    if not path.is_file():
        raise InputError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path}: unreadable safetensors file ({e}); expected a complete safetensors file") from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a corrupt or foreign file
        raise InputError(f"{path}: unreadable checkpoint ({type(e).__name__}); expected a torch state dict") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise InputError(f"{path}: expected a state dict of tensors (optionally under the key 'model')")
    return checkpoint


def find_weight_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise InputError(f"{directory}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def rename(tensors: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, tuple[str, torch.Tensor]]:
    """Map checkpoint names to runtime names with regex rules (first match wins; no match keeps the name).
    Returns {runtime name: (checkpoint name, tensor)} so errors can speak the checkpoint's language."""
    renamed = {}
    for name, tensor in tensors.items():
        target = name
        for pattern, replacement in rules:
            match = re.fullmatch(pattern, name)
            if match:
                target = match.expand(replacement)
                break
        renamed[target] = (name, tensor)
    return renamed


def assign_weights(model: nn.Module, weights: dict[str, tuple[str, torch.Tensor]], source: str) -> nn.Module:
    """Copy weights into the model as float32. Missing, unexpected, misshapen or non-finite tensors are errors."""
    expected = model.state_dict()
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [name for name in expected if name not in weights and name not in tied]
    if missing:
        raise InputError(f"{source}: missing weight(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    unexpected = [original for name, (original, _) in weights.items() if name not in expected]
    if unexpected:
        raise InputError(
            f"{source}: unexpected weight(s) {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''} "
            "for this architecture"
        )
    state = {}
    for name, (original, tensor) in weights.items():
        if name in tied:
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise InputError(
                f"{source}: weight {original} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"{source}: weight {original} contains NaN or Inf")
        if expected[name].is_floating_point():
            state[name] = tensor.float()
        elif tensor.dtype == expected[name].dtype:
            state[name] = tensor
        else:
            raise InputError(f"{source}: weight {original} has dtype {tensor.dtype}, expected {expected[name].dtype}")
    model.load_state_dict(state, strict=False)
    return model
