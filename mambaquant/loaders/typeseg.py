"""typeseg's trained Mamba (PyPI `typeseg`, Apache-2.0): a Flax checkpoint flattened into `mamba_al.npz`.

Its block differs from Mamba-1: LayerNorm with bias (eps 1e-6), biases on all four linear layers, a centred
("same") depthwise conv, dt = softplus(.) + 1e-4, and a bidirectional scan that reuses the same SSM inputs and
parameters backwards in time, the two directions added. Flax `Dense` kernels are (in, out): transposed here.
Bytes are sanitised and compacted to 130 tokens before the embedding (`typeseg_tokens`).
"""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..runtime import MambaTagger, TaggerConfig
from .weights import assign_weights

BLOCK = "CheckpointMambaBlock1D_{}__"
ALLOWED_BYTES = sorted(set(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D, 0xA4})
PLACEHOLDER_BYTE = 0xA4  # typeseg's stand-in for any byte outside the allowed set


def packaged_npz() -> Path:
    spec = importlib.util.find_spec("typeseg")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the typeseg package is not installed; pip install typeseg==0.2.7, or pass the npz path")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mamba_al.npz"


def is_typeseg_npz(tensors: dict) -> bool:
    return BLOCK.format(0) + "A_log" in tensors and "Embed_0__embedding" in tensors


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in data.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable npz file ({e})") from None


def runtime_tensors(npz: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    n_layer = sum(1 for k in npz if k.endswith("__A_log"))
    out = {
        "embedding.weight": ("Embed_0__embedding", npz["Embed_0__embedding"]),
        "norm_f.weight": ("LayerNorm_0__scale", npz["LayerNorm_0__scale"]),
        "norm_f.bias": ("LayerNorm_0__bias", npz["LayerNorm_0__bias"]),
        "head.weight": ("Dense_0__kernel", npz["Dense_0__kernel"].T),
        "head.bias": ("Dense_0__bias", npz["Dense_0__bias"]),
    }
    linears = {"Dense_0": "mixer.in_proj", "Dense_1": "mixer.ssm.x_proj", "Dense_2": "mixer.ssm.dt_proj",
               "Dense_3": "mixer.out_proj"}
    for i in range(n_layer):
        p, q = BLOCK.format(i), f"layers.{i}."
        for flax, ours in linears.items():
            out[q + ours + ".weight"] = (p + flax + "__kernel", npz[p + flax + "__kernel"].T)
            out[q + ours + ".bias"] = (p + flax + "__bias", npz[p + flax + "__bias"])
        conv = npz[p + "Conv_0__kernel"]  # (K, 1, E) -> (E, 1, K)
        out[q + "mixer.ssm.conv1d.weight"] = (p + "Conv_0__kernel", conv.permute(2, 1, 0))
        out[q + "mixer.ssm.conv1d.bias"] = (p + "Conv_0__bias", npz[p + "Conv_0__bias"])
        out[q + "mixer.ssm.A_log"] = (p + "A_log", npz[p + "A_log"])
        out[q + "mixer.ssm.D"] = (p + "D", npz[p + "D"])
        out[q + "norm.weight"] = (p + "LayerNorm_0__scale", npz[p + "LayerNorm_0__scale"])
        out[q + "norm.bias"] = (p + "LayerNorm_0__bias", npz[p + "LayerNorm_0__bias"])
    return out


def tagger_config_from_npz(npz: dict[str, torch.Tensor]) -> TaggerConfig:
    p = BLOCK.format(0)
    d_model = npz["Embed_0__embedding"].shape[1]
    return TaggerConfig(
        d_model=d_model,
        n_layer=sum(1 for k in npz if k.endswith("__A_log")),
        d_state=npz[p + "A_log"].shape[1],
        expand=npz[p + "Dense_0__kernel"].shape[1] // 2 // d_model,
        d_conv=npz[p + "Conv_0__kernel"].shape[0],
        dt_rank=npz[p + "Dense_2__kernel"].shape[0],
        bias=True,
        x_proj_bias=True,
        conv="same",
        dt_offset=1e-4,
        norm="layer",
        norm_eps=1e-6,
        bidirectional="shared",
        divide_out=False,
        vocab_size=npz["Embed_0__embedding"].shape[0],
        num_classes=npz["Dense_0__kernel"].shape[1],
    )


def build_typeseg(npz: dict[str, torch.Tensor], source: str) -> MambaTagger:
    return assign_weights(MambaTagger(tagger_config_from_npz(npz)), runtime_tensors(npz), source).eval()


def typeseg_tokens(data: bytes) -> torch.Tensor:
    """Bytes -> typeseg's compact token ids: disallowed bytes become the placeholder, bytes >= 128 share one id."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    allowed = torch.zeros(256, dtype=torch.bool)
    allowed[ALLOWED_BYTES] = True
    raw = torch.where(allowed[raw], raw, torch.full_like(raw, PLACEHOLDER_BYTE))
    return torch.where(raw < 128, raw, torch.full_like(raw, 128))
