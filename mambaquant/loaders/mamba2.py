"""Mamba-2 language models: transformers' `Mamba2ForCausalLM` (config.json model_type "mamba2", e.g.
mistralai/Mamba-Codestral-7B-v0.1), the original state-spaces layout (state-spaces/mamba2-*: config.json with
ssm_cfg.layer "Mamba2") and bare state dicts, whose configuration is read from the tensor shapes."""

import math

import torch

from ..errors import InputError
from ..runtime import Mamba2LMConfig, MambaLM
from ..schema import Field, boolean, integer, list_of, number, obj, string, validate
from . import hf
from .weights import (Checkpoint, any_named, assign_weights, check_before_loading, layer_count, load_checked, rename,
                      require)

TO_RUNTIME = [(r"backbone\.embeddings?\.weight", "embedding.weight"), (r"backbone\.(.*)", r"\1")]
TO_HF = [(r"embedding\.weight", "backbone.embeddings.weight"), (r"lm_head\.weight", "lm_head.weight"),
         (r"(.*)", r"backbone.\1")]
SIZE, MAX_LAYERS, MAX_VOCAB = hf.SIZE, hf.MAX_LAYERS, hf.MAX_VOCAB
# a time_step_limit bound: a number >= 0 or Infinity, which transformers 5.x writes as {"__float__": "Infinity"}
INFINITY_OBJECT = {"__float__": "Infinity"}
LIMIT = Field("number", low=0, special=(math.inf, INFINITY_OBJECT))

# transformers' Mamba2Config (config.json of Mamba2ForCausalLM); defaults are transformers' own
HF_SCHEMA = {
    "model_type": string(default="mamba2"),
    "architectures": list_of(string(), default=None, nullable=True, max_items=64),
    "hidden_size": integer(1, SIZE, default=4096),
    "num_hidden_layers": integer(1, MAX_LAYERS, default=64),
    "state_size": integer(1, 1024, default=128),
    "expand": integer(1, 16, default=2),
    "head_dim": integer(1, SIZE, default=64),
    "num_heads": integer(1, SIZE, default=128),
    "n_groups": integer(1, SIZE, default=8),
    "conv_kernel": integer(1, 64, default=4),
    "use_conv_bias": boolean(True),
    "use_bias": boolean(False),
    "layer_norm_epsilon": number(0, 1, default=1e-5, above=True),
    "chunk_size": integer(1, SIZE, default=256),
    "time_step_limit": list_of(LIMIT, default=[0.0, math.inf], min_items=2, max_items=2),
    "vocab_size": integer(1, MAX_VOCAB, default=32768),
    "tie_word_embeddings": boolean(False),
    "hidden_act": string("silu", "swish", default="silu"),
    "residual_in_fp32": boolean(True),
    "rms_norm": boolean(True),
    "norm_before_gate": boolean(False),
}

# mamba_ssm's Mamba2 layer options (ssm_cfg of a state-spaces config)
SSM_CFG_SCHEMA = {
    "layer": string("Mamba2"),
    "d_state": integer(1, 1024, default=128),
    "d_conv": integer(1, 64, default=4),
    "expand": integer(1, 16, default=2),
    "headdim": integer(1, SIZE, default=64),
    "d_ssm": integer(1, 16 * SIZE, default=None, nullable=True),
    "ngroups": integer(1, SIZE, default=1),
    "chunk_size": integer(1, SIZE, default=256),
    "dt_limit": list_of(LIMIT, default=[0.0, math.inf], min_items=2, max_items=2),
    "rmsnorm": boolean(True),
    "norm_before_gate": boolean(False),
    "D_has_hdim": boolean(False),
    "bias": boolean(False),
    "conv_bias": boolean(True),
}
STATE_SPACES_SCHEMA = {**hf.STATE_SPACES_SCHEMA, "ssm_cfg": obj(SSM_CFG_SCHEMA)}


def is_hf_config(config: dict) -> bool:
    architectures = config.get("architectures")
    return config.get("model_type") == "mamba2" or (
        isinstance(architectures, list) and "Mamba2ForCausalLM" in architectures)


def is_state_spaces_config(config: dict) -> bool:
    return hf.is_state_spaces_config(config) and hf.state_spaces_layer(config) == "Mamba2"


def dt_limits(limit: list, where: str, key: str) -> tuple[float, float]:
    low, high = (math.inf if bound == INFINITY_OBJECT else bound for bound in limit)
    if low == math.inf or high < low:
        raise InputError(f"{where}: {key} {limit} is not an interval [low, high] with low <= high, low finite")
    return low, 0.0 if high == math.inf else high


def lm_config_from_hf(config: dict, where: str) -> Mamba2LMConfig:
    c = validate(config, HF_SCHEMA, where)
    if not c["rms_norm"] or c["norm_before_gate"]:
        raise InputError(f"{where}: only the gated RMSNorm after the gate is supported; expected rms_norm true and "
                         "norm_before_gate false")
    d_inner = c["expand"] * c["hidden_size"]
    if c["num_heads"] * c["head_dim"] != d_inner:
        raise InputError(f"{where}: num_heads x head_dim = {c['num_heads']} x {c['head_dim']} is not expand x "
                         f"hidden_size = {d_inner}")
    low, high = dt_limits(c["time_step_limit"], where, "time_step_limit")
    values = dict(d_model=c["hidden_size"], n_layer=c["num_hidden_layers"], d_state=c["state_size"],
                  expand=c["expand"], head_dim=c["head_dim"], n_groups=c["n_groups"], d_conv=c["conv_kernel"],
                  conv_bias=c["use_conv_bias"], bias=c["use_bias"], norm_eps=c["layer_norm_epsilon"],
                  chunk_size=c["chunk_size"], dt_limit_min=low, dt_limit_max=high, vocab_size=c["vocab_size"],
                  tie_embeddings=c["tie_word_embeddings"])
    return Mamba2LMConfig.from_dict(values, where=where)


def lm_config_from_state_spaces(config: dict, where: str) -> Mamba2LMConfig:
    c = validate(config, STATE_SPACES_SCHEMA, where)
    ssm = c["ssm_cfg"]
    if not ssm["rmsnorm"] or ssm["norm_before_gate"]:
        raise InputError(f"{where}: only the gated RMSNorm after the gate is supported; expected ssm_cfg.rmsnorm "
                         "true and ssm_cfg.norm_before_gate false")
    if ssm["D_has_hdim"]:
        raise InputError(f"{where}: ssm_cfg.D_has_hdim (one D per channel) is not supported; expected false")
    padded = hf.check_state_spaces_model(c, where)
    low, high = dt_limits(ssm["dt_limit"], where, "ssm_cfg.dt_limit")
    values = dict(d_model=c["d_model"], n_layer=c["n_layer"], d_state=ssm["d_state"], expand=ssm["expand"],
                  head_dim=ssm["headdim"], n_groups=ssm["ngroups"], d_ssm=ssm["d_ssm"] or 0, d_conv=ssm["d_conv"],
                  conv_bias=ssm["conv_bias"], bias=ssm["bias"], chunk_size=ssm["chunk_size"], dt_limit_min=low,
                  dt_limit_max=high, vocab_size=padded, tie_embeddings=c["tie_embeddings"])
    return Mamba2LMConfig.from_dict(values, where=where)


def is_mamba2_state_dict(tensors: dict) -> bool:
    return any_named(tensors, hf.LAYER + r"mixer\.dt_bias")


def lm_config_from_weights(tensors: dict, source: str, n_groups: int = 1) -> Mamba2LMConfig:
    """The configuration a bare Mamba-2 LM state dict implies. Its shapes give every size but how the
    2 x n_groups x d_state channels of B and C split into groups: `n_groups` says it (1 unless given)."""
    embed_name = next((name for name in hf.EMBEDDINGS if name in tensors), hf.EMBEDDINGS[0])
    vocab, d_model = require(tensors, embed_name, 2, source)
    prefix = "backbone.layers.0.mixer."
    heads = require(tensors, prefix + "A_log", 1, source)[0]
    d_ssm = require(tensors, prefix + "norm.weight", 1, source)[0]
    conv_dim, _, d_conv = require(tensors, prefix + "conv1d.weight", 3, source)
    out_rows, d_inner = require(tensors, prefix + "out_proj.weight", 2, source)
    in_rows, in_cols = require(tensors, prefix + "in_proj.weight", 2, source)
    if d_inner % d_model or out_rows != d_model:
        raise InputError(f"{source}: weight {prefix}out_proj.weight has shape {(out_rows, d_inner)}, expected "
                         f"({d_model}, expand x {d_model}) for the embedding's width {d_model}")
    if d_ssm % heads or d_ssm > d_inner:
        raise InputError(f"{source}: weight {prefix}norm.weight has shape ({d_ssm},), expected heads x head_dim "
                         f"channels ({heads} heads from {prefix}A_log), at most d_inner {d_inner}")
    bc = conv_dim - d_ssm
    if bc <= 0 or bc % (2 * n_groups):
        raise InputError(f"{source}: weight {prefix}conv1d.weight has {conv_dim} channels, expected {d_ssm} "
                         f"(x) + 2 x n_groups x d_state (B, C) with n_groups {n_groups}")
    expected_rows = 2 * (d_inner - d_ssm) + d_ssm + conv_dim + heads
    if (in_rows, in_cols) != (expected_rows, d_model):
        raise InputError(f"{source}: weight {prefix}in_proj.weight has shape {(in_rows, in_cols)}, expected "
                         f"({expected_rows}, {d_model}) for the conv, norm and A_log shapes")
    values = dict(d_model=d_model, n_layer=layer_count(tensors, hf.LAYER, source), d_state=bc // (2 * n_groups),
                  expand=d_inner // d_model, head_dim=d_ssm // heads, n_groups=n_groups, d_ssm=d_ssm, d_conv=d_conv,
                  conv_bias=any_named(tensors, hf.LAYER + r"mixer\.conv1d\.bias"),
                  bias=any_named(tensors, hf.LAYER + r"mixer\.(in|out)_proj\.bias"), vocab_size=vocab,
                  tie_embeddings="lm_head.weight" not in tensors)
    return Mamba2LMConfig.from_dict(values, where=f"{source} (the configuration its tensors imply)")


OPTIONS_SCHEMA = {"n_groups": integer(1, SIZE, default=1)}


def load_lm_file(checkpoint: Checkpoint, source: str, options: dict) -> MambaLM:
    """A bare Mamba-2 LM state dict; `options` may say n_groups; a head equal to the embedding is tied."""
    unknown = sorted(set(options) - set(OPTIONS_SCHEMA))
    if unknown:
        raise InputError(f"{source}: unknown option(s) {', '.join(map(repr, unknown))} for a Mamba-2 checkpoint; "
                         f"expected {', '.join(OPTIONS_SCHEMA)}")
    n_groups = validate(options, OPTIONS_SCHEMA, source)["n_groups"]
    config = lm_config_from_weights(checkpoint.infos, source, n_groups)
    check_before_loading(lambda: MambaLM(config), rename(checkpoint.infos, TO_RUNTIME), checkpoint.nbytes, source,
                         TO_HF)
    tensors = checkpoint.read()
    return load_tensors(hf.tied_if_equal(config, tensors), tensors, source)


def load_tensors(config: Mamba2LMConfig, tensors: dict[str, torch.Tensor], source: str) -> MambaLM:
    return assign_weights(MambaLM(config), rename(tensors, TO_RUNTIME), source).eval()


def load_lm(config: Mamba2LMConfig, checkpoint: Checkpoint, source: str) -> MambaLM:
    return load_checked(lambda: MambaLM(config), checkpoint, TO_RUNTIME, source, TO_HF)


def from_transformers(hf_model) -> MambaLM:
    """An in-memory transformers `Mamba2ForCausalLM` -> our runtime, same weights."""
    where = type(hf_model).__name__
    values = hf_model.config.to_dict()
    values["time_step_limit"] = [float(v) for v in values.get("time_step_limit", (0.0, math.inf))]
    config = lm_config_from_hf(values, where)
    return load_tensors(config, {k: v.detach() for k, v in hf_model.state_dict().items()}, where)


def saved_config(config: Mamba2LMConfig) -> dict:
    """transformers' Mamba2Config dict, or where transformers has no place for a part of the model (an MLP beside
    the SSM, d_ssm < d_inner) the state-spaces layout."""
    limit = [config.dt_limit_min, config.dt_limit_max or math.inf]
    if config.d_mlp:
        return {"d_model": config.d_model, "n_layer": config.n_layer, "vocab_size": config.vocab_size,
                "ssm_cfg": {"layer": "Mamba2", "d_state": config.d_state, "d_conv": config.d_conv,
                            "expand": config.expand, "headdim": config.head_dim, "d_ssm": config.d_ssm,
                            "ngroups": config.n_groups, "chunk_size": config.chunk_size, "dt_limit": limit,
                            "bias": config.bias, "conv_bias": config.conv_bias},
                "rms_norm": True, "residual_in_fp32": True, "pad_vocab_size_multiple": 1,
                "tie_embeddings": config.tie_embeddings}
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": config.d_state,
        "expand": config.expand,
        "head_dim": config.head_dim,
        "num_heads": config.n_heads,
        "n_groups": config.n_groups,
        "conv_kernel": config.d_conv,
        "use_conv_bias": config.conv_bias,
        "use_bias": config.bias,
        "layer_norm_epsilon": config.norm_eps,
        "chunk_size": config.chunk_size,
        "time_step_limit": limit,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "rms_norm": True,
    }


def saved_state_dict(model: MambaLM) -> dict[str, torch.Tensor]:
    rules = TO_HF if not model.config.d_mlp else [(r"embedding\.weight", "backbone.embedding.weight"), *TO_HF[1:]]
    return {name: tensor.contiguous() for name, (_, tensor) in rename(model.state_dict(), rules).items()
            if not (model.config.tie_embeddings and name == "lm_head.weight")}
