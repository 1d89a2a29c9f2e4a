"""Mamba-1 language models in the Hugging Face layout (`MambaForCausalLM`, state-spaces/mamba-*-hf) and in the
original state-spaces layout (config.json with d_model / n_layer / ssm_cfg, `backbone.embedding.weight`)."""

import math

import torch

from ..errors import InputError
from ..runtime import LMConfig, MambaLM
from .weights import assign_weights, rename

# checkpoint name -> runtime name
TO_RUNTIME = [
    (r"backbone\.embeddings?\.weight", "embedding.weight"),
    (r"backbone\.layers\.(\d+)\.mixer\.(conv1d\.\w+|x_proj\.weight|dt_proj\.\w+|A_log|D)", r"layers.\1.mixer.ssm.\2"),
    (r"backbone\.(.*)", r"\1"),
]
# runtime name -> Hugging Face name
TO_HF = [
    (r"embedding\.weight", "backbone.embeddings.weight"),
    (r"layers\.(\d+)\.mixer\.ssm\.(.*)", r"backbone.layers.\1.mixer.\2"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"(.*)", r"backbone.\1"),
]


def is_hf_config(config: dict) -> bool:
    return config.get("model_type") == "mamba" or "MambaForCausalLM" in config.get("architectures", [])


def is_state_spaces_config(config: dict) -> bool:
    return {"d_model", "n_layer", "vocab_size"} <= config.keys() and "ssm_cfg" in config


def lm_config_from_hf(config: dict, source: str) -> LMConfig:
    if config.get("hidden_act", "silu") != "silu":
        raise InputError(f"{source}: hidden_act {config['hidden_act']!r} is not supported; expected 'silu'")
    hidden = config.get("hidden_size", 768)
    rank = config.get("time_step_rank", "auto")
    return LMConfig(
        d_model=hidden,
        n_layer=config.get("num_hidden_layers", 32),
        d_state=config.get("state_size", 16),
        expand=config.get("expand", 2),
        d_conv=config.get("conv_kernel", 4),
        dt_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
        conv_bias=config.get("use_conv_bias", True),
        bias=config.get("use_bias", False),
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        vocab_size=config.get("vocab_size", 50280),
        tie_embeddings=config.get("tie_word_embeddings", True),
    )


def lm_config_from_state_spaces(config: dict, source: str) -> LMConfig:
    ssm = config.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise InputError(f"{source}: {ssm['layer']} layers are not supported; expected Mamba-1 blocks")
    if not config.get("rms_norm", True):
        raise InputError(f"{source}: LayerNorm language models are not supported; expected rms_norm true")
    vocab, multiple = config["vocab_size"], config.get("pad_vocab_size_multiple", 1)
    return LMConfig(
        d_model=config["d_model"],
        n_layer=config["n_layer"],
        d_state=ssm.get("d_state", 16),
        expand=ssm.get("expand", 2),
        d_conv=ssm.get("d_conv", 4),
        dt_rank=0 if ssm.get("dt_rank", "auto") == "auto" else int(ssm["dt_rank"]),
        conv_bias=ssm.get("conv_bias", True),
        bias=ssm.get("bias", False),
        vocab_size=math.ceil(vocab / multiple) * multiple,
        tie_embeddings=config.get("tie_embeddings", True),
    )


def lm_config_from_weights(tensors: dict[str, torch.Tensor]) -> LMConfig:
    """Infer the configuration of a bare Mamba LM state dict from its tensor shapes."""
    embed = next(t for k, t in tensors.items() if k.endswith(("embeddings.weight", "embedding.weight")))
    n_layer = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("backbone.layers."))
    prefix = "backbone.layers.0.mixer."
    in_proj, dt_proj = tensors[prefix + "in_proj.weight"], tensors[prefix + "dt_proj.weight"]
    head = tensors.get("lm_head.weight")
    return LMConfig(
        d_model=embed.shape[1],
        n_layer=n_layer,
        d_state=tensors[prefix + "A_log"].shape[1],
        expand=in_proj.shape[0] // 2 // embed.shape[1],
        d_conv=tensors[prefix + "conv1d.weight"].shape[2],
        dt_rank=dt_proj.shape[1],
        conv_bias=prefix + "conv1d.bias" in tensors,
        bias=prefix + "in_proj.bias" in tensors,
        vocab_size=embed.shape[0],
        tie_embeddings=head is None or head is embed or torch.equal(head, embed),
    )


def build_lm(config: LMConfig, tensors: dict[str, torch.Tensor], source: str) -> MambaLM:
    return assign_weights(MambaLM(config), rename(tensors, TO_RUNTIME), source).eval()


def from_transformers(hf_model) -> MambaLM:
    """An in-memory transformers `MambaForCausalLM` -> our runtime, same weights."""
    config = lm_config_from_hf(hf_model.config.to_dict(), type(hf_model).__name__)
    tensors = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return build_lm(config, tensors, type(hf_model).__name__)


def hf_config(config: LMConfig) -> dict:
    """Our LMConfig as a transformers MambaConfig dict (for writing checkpoints transformers can read)."""
    if config.norm != "rms" or config.bidirectional != "none" or config.x_proj_bias or config.dt_offset:
        raise ValueError("only RMSNorm causal models have a Hugging Face Mamba layout")
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": config.d_state,
        "expand": config.expand,
        "intermediate_size": config.d_inner,
        "conv_kernel": config.d_conv,
        "time_step_rank": config.dt_rank,
        "use_conv_bias": config.conv_bias,
        "use_bias": config.bias,
        "layer_norm_epsilon": config.norm_eps,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "residual_in_fp32": True,
    }


def hf_state_dict(model: MambaLM) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (_, tensor) in rename(model.state_dict(), TO_HF).items():
        if not (model.config.tie_embeddings and name == "lm_head.weight"):
            tensors[name] = tensor.contiguous()
    return tensors
