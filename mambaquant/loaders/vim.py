"""Vision Mamba checkpoints with the official hustvl/Vim state-dict names (`conv1d_b`, `A_b_log`, ...)."""

import math

import torch

from ..errors import InputError
from ..runtime import VisionConfig, VisionMamba
from ..schema import integer, validate
from .weights import (Checkpoint, any_named, assign_weights, load_checked, mamba_block_shapes, rename,
                      require)

MIXER = r"layers\.(\d+)\.mixer\."
TO_RUNTIME = [
    (MIXER + r"(conv1d|x_proj|dt_proj)_b\.(\w+)", r"layers.\1.mixer.ssm_b.\2.\3"),
    (MIXER + r"A_b_log", r"layers.\1.mixer.ssm_b.A_log"),
    (MIXER + r"D_b", r"layers.\1.mixer.ssm_b.D"),
    (MIXER + r"(conv1d\.\w+|x_proj\.weight|dt_proj\.\w+|A_log|D)", r"layers.\1.mixer.ssm.\2"),
]
TO_VIM = [
    (MIXER + r"ssm_b\.(conv1d|x_proj|dt_proj)\.(\w+)", r"layers.\1.mixer.\2_b.\3"),
    (MIXER + r"ssm_b\.A_log", r"layers.\1.mixer.A_b_log"),
    (MIXER + r"ssm_b\.D", r"layers.\1.mixer.D_b"),
    (MIXER + r"ssm\.(.*)", r"layers.\1.mixer.\2"),
]
COMMON_IMAGE_SIZES = (224, 384, 448, 512, 256, 128, 96, 64, 32, 28)


VIM_TOP_LEVEL = ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token")
LAYER = r"layers\.(\d+)\."
OPTIONS_SCHEMA = {"img_size": integer(1, 8192, default=None), "stride": integer(1, 1024, default=None)}


def is_vim_state_dict(tensors: dict) -> bool:
    return any(name in tensors for name in VIM_TOP_LEVEL)


def vision_config_from_weights(tensors: dict, overrides: dict | None = None,
                               source: str = "checkpoint") -> VisionConfig:
    """Infer a Vim configuration from tensor shapes (tensors or TensorInfos). The stride and image size are not
    stored in a state dict: they come from `overrides` when given, else the first of stride = patch or patch / 2
    that yields a common image size (Vim-T/S/B use stride 16 at 224, the "+" fine-tuned models stride 8)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OPTIONS_SCHEMA))
    if unknown:
        raise InputError(f"{source}: unknown option(s) {', '.join(map(repr, unknown))} for a Vim checkpoint; "
                         f"expected {' and '.join(OPTIONS_SCHEMA)}")
    options = {k: v for k, v in validate(overrides, OPTIONS_SCHEMA, source).items() if k in overrides}
    d_model, in_chans, patch, _ = require(tensors, "patch_embed.proj.weight", 4, source)
    positions = require(tensors, "pos_embed", 3, source)[1] - 1
    grid = math.isqrt(max(positions, 0))
    if positions < 1 or grid * grid != positions:
        raise InputError(f"{source}: pos_embed holds {positions + 1} positions; expected a square grid plus one class "
                         "token")
    if "stride" not in options or "img_size" not in options:
        candidates = [s for s in (patch, patch // 2) if s > 0]
        if "stride" in options:
            candidates = [options["stride"]]
        sizes = {s: (grid - 1) * s + patch for s in candidates}
        stride = next((s for s, size in sizes.items() if size in COMMON_IMAGE_SIZES), candidates[0])
        options.setdefault("stride", stride)
        options.setdefault("img_size", sizes[stride])
    values = dict(
        **mamba_block_shapes(tensors, LAYER, "layers.0.", d_model, "the patch embedding's", source),
        norm="layer" if "norm_f.bias" in tensors or any_named(tensors, r"layers\.\d+\.norm\.bias") else "rms",
        bidirectional="separate" if any_named(tensors, MIXER + r"((conv1d_b|x_proj_b|dt_proj_b)\.\w+|A_b_log|D_b)")
        else "none",
        patch_size=patch,
        in_chans=in_chans,
        num_classes=require(tensors, "head.weight", 2, source)[0],
    )
    values.update(options)
    return VisionConfig.from_dict(values, where=f"{source} (the configuration its tensors imply)")


def build_vim(config: VisionConfig, tensors: dict[str, torch.Tensor], source: str) -> VisionMamba:
    return assign_weights(VisionMamba(config), rename(tensors, TO_RUNTIME), source).eval()


def load_vim(config: VisionConfig, checkpoint: Checkpoint, source: str) -> VisionMamba:
    return load_checked(lambda: VisionMamba(config), checkpoint, TO_RUNTIME, source, TO_VIM)


def has_vim_layout(config: VisionConfig) -> bool:
    """Whether the official Vim names describe this composition (otherwise it is saved as a composed model)."""
    return (config.stem, config.cls_token, config.pos_embed, config.pooling, config.head, config.final_norm,
            config.residual) == ("patch", "middle", True, "cls", "linear", "same", True) and config.norm != "none" \
        and config.bidirectional in ("none", "separate")


def vim_state_dict(model: VisionMamba) -> dict[str, torch.Tensor]:
    return {name: tensor.contiguous() for name, (_, tensor) in rename(model.state_dict(), TO_VIM).items()}
