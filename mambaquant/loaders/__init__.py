"""`load(source)`: an embedded model name, a directory, a checkpoint file or an in-memory model -> our runtime."""

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..errors import InputError
from ..outputs import write_atomic_dir
from ..runtime import MambaLM, MambaTagger, TaggerConfig, VisionConfig, VisionMamba
from . import hf, quantized, typeseg, vim
from .weights import assign_weights, find_weight_file, read_tensors, rename

SUPPORTED = (
    "Mamba-1 language models (Hugging Face MambaForCausalLM or the original state-spaces layout), "
    "Vision Mamba (hustvl/Vim state dicts) and typeseg's Mamba tagger (mamba_al.npz)"
)
VISION_ARCHITECTURE = "vision-mamba"
TAGGER_ARCHITECTURE = "mamba-tagger"


def load(source, **vision_options) -> nn.Module:
    """Return a `MambaLM` or `VisionMamba` in eval mode. `vision_options` (img_size, stride) complete a bare Vim
    checkpoint, whose state dict does not record them."""
    if isinstance(source, (MambaLM, VisionMamba, MambaTagger)):
        return source
    if isinstance(source, nn.Module):
        if type(source).__name__ == "MambaForCausalLM":
            return hf.from_transformers(source)
        raise InputError(f"unsupported model object {type(source).__name__}; supported: {SUPPORTED}")
    from ..zoo import ZOO, load_zoo_model

    name = str(source)
    check_source(name)
    if name in ZOO:
        return load_zoo_model(name)
    path = Path(name)
    if path.is_dir():
        return load_directory(path)
    return load_checkpoint_file(path, vision_options)


def check_source(name: str) -> None:
    """Raise the one-line error for a source that is neither an embedded model nor an existing path."""
    from ..zoo import ZOO

    if name not in ZOO and not Path(name).exists():
        raise InputError(
            f"{name}: no such file or directory, and not an embedded model "
            f"(expected one of {', '.join(ZOO)}, a model directory or a checkpoint file)"
        )


def read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InputError(
            f"{directory}: no config.json; expected a model directory (config.json + model.safetensors) "
            "or a checkpoint file"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    return config


def load_directory(directory: Path) -> nn.Module:
    config = read_config(directory)
    source = str(directory)
    if hf.is_hf_config(config):
        lm_config = hf.lm_config_from_hf(config, source)
    elif hf.is_state_spaces_config(config):
        lm_config = hf.lm_config_from_state_spaces(config, source)
    elif config.get("architecture") == VISION_ARCHITECTURE:
        tensors = read_tensors(find_weight_file(directory))
        return vim.build_vim(VisionConfig.from_dict(config), tensors, source)
    elif quantized.is_quantized_config(config):
        return quantized.build_quantized(config, read_tensors(find_weight_file(directory)), source)
    elif config.get("architecture") == TAGGER_ARCHITECTURE:
        tensors = rename(read_tensors(find_weight_file(directory)), [])
        return assign_weights(MambaTagger(TaggerConfig.from_dict(config)), tensors, source).eval()
    else:
        found = config.get("architectures") or config.get("model_type") or config.get("architecture") or "unknown"
        raise InputError(f"{directory}: unsupported architecture {found}; supported: {SUPPORTED}")
    return hf.build_lm(lm_config, read_tensors(find_weight_file(directory)), source)


def load_checkpoint_file(path: Path, vision_options: dict) -> nn.Module:
    if path.suffix == ".npz":
        tensors = typeseg.read_npz(path)
        if typeseg.is_typeseg_npz(tensors):
            return typeseg.build_typeseg(tensors, str(path))
        raise InputError(f"{path}: unrecognised npz checkpoint; supported: {SUPPORTED}")
    tensors = read_tensors(path)
    if vim.is_vim_state_dict(tensors):
        return vim.build_vim(vim.vision_config_from_weights(tensors, vision_options), tensors, str(path))
    if any(k.startswith("backbone.layers.0.mixer.") for k in tensors):
        return hf.build_lm(hf.lm_config_from_weights(tensors), tensors, str(path))
    raise InputError(f"{path}: unrecognised checkpoint; supported: {SUPPORTED}")


def save(model: nn.Module, directory: str | Path, overwrite: bool = False, notes: tuple[str, ...] = ()) -> Path:
    """Write a model as config.json + model.safetensors (+ MODEL_CARD.md with `notes` for a quantized model).
    Full precision: the Hugging Face Mamba layout for language models (transformers can read it), the official
    Vim names for vision models. Quantized (`mambaquant.quantize`'s output): integer codes and everything
    that rebuilds the quantized model (see `loaders.quantized`). Atomic: written to a temporary directory that is
    renamed into place at the end, so an interrupted save leaves nothing that looks complete."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise InputError(f"{directory}: already exists; pass overwrite=True (--overwrite) to replace it")
    card = None
    if hasattr(model, "quantization_report"):
        tensors, layout = quantized.quantized_tensors_and_layout(model)
        config = quantized.quantized_config(model, layout)
        card = quantized.model_card(config, notes)
    elif isinstance(model, MambaLM):
        config, tensors = hf.hf_config(model.config), hf.hf_state_dict(model)
    elif isinstance(model, VisionMamba):
        config = {"architecture": VISION_ARCHITECTURE, **model.config.to_dict()}
        tensors = vim.vim_state_dict(model)
    elif isinstance(model, MambaTagger):
        config = {"architecture": TAGGER_ARCHITECTURE, **model.config.to_dict()}
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    else:
        raise InputError(f"cannot save a {type(model).__name__}; expected MambaLM, VisionMamba or MambaTagger")

    def write(staging: Path) -> None:
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, staging / "model.safetensors")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if card:
            (staging / "MODEL_CARD.md").write_text(card)

    write_atomic_dir(directory, write)
    return directory

