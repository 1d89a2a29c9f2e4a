"""Mamba-1 language models in the Hugging Face layout (`MambaForCausalLM`, state-spaces/mamba-*-hf;
`FalconMambaForCausalLM`, the same layout with weight-less RMS norms on dt, B and C) and in the
original state-spaces layout (config.json with d_model / n_layer / ssm_cfg, `backbone.embedding.weight`)."""

import dataclasses
import math

import torch

from ..errors import InputError
from ..runtime import LMConfig, MambaLM
from ..schema import boolean, display, integer, list_of, number, obj, string, validate
from .weights import (Checkpoint, assign_weights, check_before_loading, load_checked, mamba_block_shapes, rename,
                      require)

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


SIZE = 65536  # the largest d_model / d_inner / dt_rank accepted (the memory check still applies below it)
MAX_LAYERS = 1024
MAX_VOCAB = 2**24

# transformers' MambaConfig (config.json of MambaForCausalLM); defaults are transformers' own
HF_SCHEMA = {
    "model_type": string(default="mamba"),
    "architectures": list_of(string(), default=None, nullable=True, max_items=64),
    "hidden_size": integer(1, SIZE, default=768),
    "num_hidden_layers": integer(1, MAX_LAYERS, default=32),
    "state_size": integer(1, 1024, default=16),
    "expand": integer(1, 16, default=2),
    "intermediate_size": integer(1, 16 * SIZE, default=None, nullable=True),  # must be expand * hidden_size
    "conv_kernel": integer(1, 64, default=4),
    "time_step_rank": integer(1, SIZE, default="auto", special=("auto",)),
    "use_conv_bias": boolean(True),
    "use_bias": boolean(False),
    "layer_norm_epsilon": number(0, 1, default=1e-5, above=True),
    "vocab_size": integer(1, MAX_VOCAB, default=50280),
    "tie_word_embeddings": boolean(True),
    "hidden_act": string("silu", "swish", default="silu"),
    "residual_in_fp32": boolean(True),
    "mixer_rms_eps": number(0, 1, default=1e-6, above=True),  # FalconMamba's
}
FALCON_MAMBA = ("falcon_mamba", "FalconMambaForCausalLM")

# the original state-spaces/mamba config (mamba_ssm's MambaConfig)
SSM_CFG_SCHEMA = {
    "layer": string(default="Mamba1"),
    "d_state": integer(1, 1024, default=16),
    "d_conv": integer(1, 64, default=4),
    "expand": integer(1, 16, default=2),
    "dt_rank": integer(1, SIZE, default="auto", special=("auto",)),
    "conv_bias": boolean(True),
    "bias": boolean(False),
    "use_fast_path": boolean(True),
}
STATE_SPACES_SCHEMA = {
    "d_model": integer(1, SIZE),
    "n_layer": integer(1, MAX_LAYERS),
    "vocab_size": integer(1, MAX_VOCAB),
    "ssm_cfg": obj(SSM_CFG_SCHEMA, default={}),
    "d_intermediate": integer(0, 16 * SIZE, default=0),  # an MLP after each mixer (mamba_ssm >= 2): not supported
    "attn_layer_idx": list_of(integer(0, MAX_LAYERS - 1), default=[]),  # hybrid attention layers: not supported
    "attn_cfg": obj(default={}),
    "rms_norm": boolean(True),
    "residual_in_fp32": boolean(True),
    "fused_add_norm": boolean(True),
    "pad_vocab_size_multiple": integer(1, SIZE, default=1),
    "tie_embeddings": boolean(True),
}


def is_hf_config(config: dict) -> bool:
    architectures = config.get("architectures")
    return config.get("model_type") in ("mamba", FALCON_MAMBA[0]) or (
        isinstance(architectures, list) and bool({"MambaForCausalLM", FALCON_MAMBA[1]} & set(architectures)))


def is_falcon_mamba(config: dict) -> bool:
    architectures = config.get("architectures")
    return config.get("model_type") == FALCON_MAMBA[0] or (
        isinstance(architectures, list) and FALCON_MAMBA[1] in architectures)


def is_state_spaces_config(config: dict) -> bool:
    return "ssm_cfg" in config or {"d_model", "n_layer", "vocab_size"} <= config.keys()


def lm_config_from_hf(config: dict, where: str) -> LMConfig:
    """transformers' MambaConfig dict -> LMConfig, every field checked; `where` (the config file) starts errors."""
    c = validate(config, HF_SCHEMA, where)
    hidden, rank = c["hidden_size"], c["time_step_rank"]
    if c["intermediate_size"] is not None and c["intermediate_size"] != c["expand"] * hidden:
        raise InputError(f"{where}: intermediate_size {c['intermediate_size']} is not expand x hidden_size = "
                         f"{c['expand']} x {hidden} = {c['expand'] * hidden}")
    return LMConfig(
        d_model=hidden,
        n_layer=c["num_hidden_layers"],
        d_state=c["state_size"],
        expand=c["expand"],
        d_conv=c["conv_kernel"],
        dt_rank=math.ceil(hidden / 16) if rank == "auto" else rank,
        conv_bias=c["use_conv_bias"],
        bias=c["use_bias"],
        norm_eps=c["layer_norm_epsilon"],
        vocab_size=c["vocab_size"],
        tie_embeddings=c["tie_word_embeddings"],
        mixer_rms_eps=c["mixer_rms_eps"] if is_falcon_mamba(config) else 0.0,
    )


def state_spaces_layer(config: dict) -> object:
    """The block kind a state-spaces config names (ssm_cfg.layer; Mamba1 when absent)."""
    ssm = config.get("ssm_cfg")
    return ssm.get("layer", "Mamba1") if isinstance(ssm, dict) else "Mamba1"


def check_state_spaces_model(c: dict, where: str) -> int:
    """The options of a validated state-spaces config that neither block kind supports; returns the padded
    vocabulary size."""
    if not c["rms_norm"]:
        raise InputError(f"{where}: LayerNorm language models are not supported; expected rms_norm true")
    if c["attn_layer_idx"]:
        raise InputError(f"{where}: hybrid models with attention layers (attn_layer_idx) are not supported; "
                         "expected Mamba blocks only")
    if c["d_intermediate"]:
        raise InputError(f"{where}: blocks with an MLP (d_intermediate {c['d_intermediate']}) are not supported; "
                         "expected d_intermediate 0")
    vocab, multiple = c["vocab_size"], c["pad_vocab_size_multiple"]
    padded = -(-vocab // multiple) * multiple
    if padded > MAX_VOCAB:
        raise InputError(f"{where}: vocab_size {vocab} padded to a multiple of {multiple} is {padded}, more than "
                         f"{MAX_VOCAB}")
    return padded


def lm_config_from_state_spaces(config: dict, where: str) -> LMConfig:
    c = validate(config, STATE_SPACES_SCHEMA, where)
    ssm = c["ssm_cfg"]
    if ssm["layer"] != "Mamba1":
        raise InputError(f"{where}: ssm_cfg.layer {display(ssm['layer'])} is not supported; expected Mamba1 or "
                         "Mamba2")
    padded = check_state_spaces_model(c, where)
    return LMConfig(
        d_model=c["d_model"],
        n_layer=c["n_layer"],
        d_state=ssm["d_state"],
        expand=ssm["expand"],
        d_conv=ssm["d_conv"],
        dt_rank=0 if ssm["dt_rank"] == "auto" else ssm["dt_rank"],
        conv_bias=ssm["conv_bias"],
        bias=ssm["bias"],
        vocab_size=padded,
        tie_embeddings=c["tie_embeddings"],
    )


EMBEDDINGS = ("backbone.embeddings.weight", "backbone.embedding.weight")
LAYER = r"backbone\.layers\.(\d+)\."


def is_lm_state_dict(tensors: dict) -> bool:
    return any(name.startswith("backbone.") for name in tensors)


def lm_config_from_weights(tensors: dict, source: str) -> LMConfig:
    """Infer the configuration of a bare Mamba LM state dict from its tensor shapes (tensors or TensorInfos).
    The head is taken as untied when present (see `load_lm_file`)."""
    embed_name = next((name for name in EMBEDDINGS if name in tensors), EMBEDDINGS[0])
    vocab, d_model = require(tensors, embed_name, 2, source)
    values = dict(
        **mamba_block_shapes(tensors, LAYER, "backbone.layers.0.", d_model, "the embedding's", source),
        vocab_size=vocab,
        tie_embeddings="lm_head.weight" not in tensors,
    )
    return LMConfig.from_dict(values, where=f"{source} (the configuration its tensors imply)")


def load_lm_file(checkpoint: Checkpoint, source: str) -> MambaLM:
    """A bare LM state dict: configuration from the tensor shapes; a head equal to the embedding is tied."""
    config = lm_config_from_weights(checkpoint.infos, source)
    check_before_loading(lambda: MambaLM(config), rename(checkpoint.infos, TO_RUNTIME), checkpoint.nbytes, source,
                         TO_HF)
    tensors = checkpoint.read()
    return assign_weights(MambaLM(tied_if_equal(config, tensors)), rename(tensors, TO_RUNTIME), source).eval()


def tied_if_equal(config, tensors: dict[str, torch.Tensor]):
    """The config of a bare LM file, its head tied when the file's head equals its embedding."""
    head = tensors.get("lm_head.weight")
    embed = next(tensors[name] for name in EMBEDDINGS if name in tensors)
    if head is not None and (head is embed or (head.dtype == embed.dtype and torch.equal(head, embed))):
        return dataclasses.replace(config, tie_embeddings=True)
    return config


def build_lm(config: LMConfig, tensors: dict[str, torch.Tensor], source: str) -> MambaLM:
    return assign_weights(MambaLM(config), rename(tensors, TO_RUNTIME), source).eval()


def load_lm(config: LMConfig, checkpoint: Checkpoint, source: str) -> MambaLM:
    return load_checked(lambda: MambaLM(config), checkpoint, TO_RUNTIME, source, TO_HF)


def from_transformers(hf_model) -> MambaLM:
    """An in-memory transformers `MambaForCausalLM` or `FalconMambaForCausalLM` -> our runtime, same weights."""
    config = lm_config_from_hf(hf_model.config.to_dict(), type(hf_model).__name__)
    tensors = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return build_lm(config, tensors, type(hf_model).__name__)


def hf_config(config: LMConfig) -> dict:
    """Our LMConfig as a transformers MambaConfig dict (for writing checkpoints transformers can read)."""
    if config.norm != "rms" or config.bidirectional != "none" or config.x_proj_bias or config.dt_offset:
        raise ValueError("only RMSNorm causal models have a Hugging Face Mamba layout")
    falcon = {"mixer_rms_eps": config.mixer_rms_eps} if config.mixer_rms_eps else {}
    return {
        "architectures": [FALCON_MAMBA[1] if falcon else "MambaForCausalLM"],
        "model_type": FALCON_MAMBA[0] if falcon else "mamba",
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
        **falcon,
    }


def hf_state_dict(model: MambaLM) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (_, tensor) in rename(model.state_dict(), TO_HF).items():
        if not (model.config.tie_embeddings and name == "lm_head.weight"):
            tensors[name] = tensor.contiguous()
    return tensors
