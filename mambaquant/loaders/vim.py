"""Vision Mamba checkpoints with the official hustvl/Vim state-dict names (`conv1d_b`, `A_b_log`, ...)."""

import math

import torch

from ..errors import InputError
from ..runtime import VisionConfig, VisionMamba
from .weights import assign_weights, rename

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


def is_vim_state_dict(tensors: dict) -> bool:
    return "patch_embed.proj.weight" in tensors and "layers.0.mixer.in_proj.weight" in tensors


def vision_config_from_weights(tensors: dict[str, torch.Tensor], overrides: dict | None = None) -> VisionConfig:
    """Infer a Vim configuration from tensor shapes. The stride and image size are not stored in a state dict:
    they come from `overrides` when given, else the first of stride = patch or patch / 2 that yields a common
    image size (Vim-T/S/B use stride 16 at 224, the "+" fine-tuned models stride 8)."""
    patch_weight = tensors["patch_embed.proj.weight"]
    d_model, in_chans, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    grid = math.isqrt(tensors["pos_embed"].shape[1] - 1)
    if grid * grid != tensors["pos_embed"].shape[1] - 1:
        raise InputError(f"pos_embed holds {tensors['pos_embed'].shape[1]} positions; expected a square grid plus one class token")
    overrides = dict(overrides or {})
    if "stride" not in overrides or "img_size" not in overrides:
        candidates = [s for s in (patch, patch // 2) if s > 0]
        if "stride" in overrides:
            candidates = [overrides["stride"]]
        sizes = {s: (grid - 1) * s + patch for s in candidates}
        stride = next((s for s, size in sizes.items() if size in COMMON_IMAGE_SIZES), candidates[0])
        overrides.setdefault("stride", stride)
        overrides.setdefault("img_size", sizes[stride])
    prefix = "layers.0.mixer."
    in_proj = tensors[prefix + "in_proj.weight"]
    values = dict(
        d_model=d_model,
        n_layer=1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("layers.")),
        d_state=tensors[prefix + "A_log"].shape[1],
        expand=in_proj.shape[0] // 2 // d_model,
        d_conv=tensors[prefix + "conv1d.weight"].shape[2],
        dt_rank=tensors[prefix + "dt_proj.weight"].shape[1],
        conv_bias=prefix + "conv1d.bias" in tensors,
        bias=prefix + "in_proj.bias" in tensors,
        norm="layer" if "norm_f.bias" in tensors else "rms",
        bidirectional="separate" if prefix + "A_b_log" in tensors else "none",
        patch_size=patch,
        in_chans=in_chans,
        num_classes=tensors["head.weight"].shape[0],
    )
    values.update(overrides)
    return VisionConfig(**values)


def build_vim(config: VisionConfig, tensors: dict[str, torch.Tensor], source: str) -> VisionMamba:
    model = VisionMamba(config)
    return assign_weights(model, rename(tensors, TO_RUNTIME), source).eval()


def vim_state_dict(model: VisionMamba) -> dict[str, torch.Tensor]:
    return {name: tensor.contiguous() for name, (_, tensor) in rename(model.state_dict(), TO_VIM).items()}
