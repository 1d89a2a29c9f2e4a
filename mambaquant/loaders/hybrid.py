"""Hybrid language models as transformers saves them -> our runtime: Granite-4.0-H (`granitemoehybrid`), Bamba
(`bamba`), Nemotron-H (`nemotron_h`), Jamba (`jamba`), Falcon-H1 (`falcon_h1`) and Zamba2 (`zamba2`), each a
`MambaLM` whose blocks follow the model's pattern (`HybridLMConfig`). docs/hybrids.md says what each computes; the tests hold our logits to transformers'."""

import math

import torch
from torch import nn

from ..errors import InputError
from ..runtime import MambaLM
from ..runtime.config import Mamba2Config, MambaConfig
from ..runtime.hybrid_config import AttentionConfig, HybridLMConfig, MLPConfig, MoEConfig
from ..schema import boolean, integer, list_of, number, obj, string, validate
from .hybrid_layers import attention_weights, mlp_weights, moe_weights
from .mamba2 import LIMIT, dt_limits
from .weights import Checkpoint, assign_weights, check_memory, on_meta_device

SIZE = 65536
MAMBA_TYPES = ("mamba", "linear_attention")  # transformers 5 renames the layer types of older configs
ATTENTION_TYPES = ("attention", "full_attention")
COMMON_SCHEMA = {
    "vocab_size": integer(1, 2**24),
    "hidden_size": integer(1, SIZE),
    "tie_word_embeddings": boolean(False),
    "num_attention_heads": integer(1, 4096, default=32),
    "num_key_value_heads": integer(1, 4096, default=None, nullable=True),
    "attention_bias": boolean(False),
    "time_step_limit": list_of(LIMIT, default=[0.0, math.inf], min_items=2, max_items=2),
    "rope_parameters": obj(default=None, nullable=True),
    "intermediate_size": integer(1, 16 * SIZE),
}
GRANITE_SCHEMA = {
    **COMMON_SCHEMA,
    "layer_types": list_of(string(*MAMBA_TYPES, *ATTENTION_TYPES), min_items=1, max_items=1024),
    "rms_norm_eps": number(0, 1, default=1e-6, above=True),
    "embedding_multiplier": number(0, 1e6, default=1.0, above=True),
    "residual_multiplier": number(0, 1e6, default=1.0, above=True),
    "attention_multiplier": number(0, 1e6, default=1.0, above=True),
    "logits_scaling": number(0, 1e6, default=1.0, above=True),
    "position_embedding_type": string("rope", "nope", default=None, nullable=True),
    "num_local_experts": integer(0, 4096, default=0),
    "num_experts_per_tok": integer(1, 4096, default=2),
    "shared_intermediate_size": integer(1, 16 * SIZE),
    "mamba_n_heads": integer(1, SIZE), "mamba_d_head": integer(1, SIZE), "mamba_n_groups": integer(1, SIZE),
    "mamba_d_state": integer(1, 1024), "mamba_d_conv": integer(1, 64), "mamba_conv_bias": boolean(True),
    "mamba_proj_bias": boolean(False),
}
BAMBA_SCHEMA = {
    **COMMON_SCHEMA,
    "num_hidden_layers": integer(1, 1024),
    "attn_layer_indices": list_of(integer(0, 1023), default=None, nullable=True, max_items=1024),
    "rms_norm_eps": number(0, 1, default=1e-5, above=True),
    "mlp_bias": boolean(False),
    "mamba_n_heads": integer(1, SIZE), "mamba_d_head": integer(1, SIZE), "mamba_n_groups": integer(1, SIZE),
    "mamba_d_state": integer(1, 1024), "mamba_d_conv": integer(1, 64), "mamba_conv_bias": boolean(True),
    "mamba_proj_bias": boolean(False),
}
NEMOTRON_KINDS = {"mamba": "mamba2", "linear_attention": "mamba2", "attention": "attention",
                  "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
NEMOTRON_SCHEMA = {
    **COMMON_SCHEMA,
    "layers_block_type": list_of(string(*NEMOTRON_KINDS), min_items=1, max_items=1024),
    "head_dim": integer(1, SIZE, default=None, nullable=True),
    "layer_norm_epsilon": number(0, 1, default=1e-5, above=True),
    "mlp_hidden_act": string("relu2", default="relu2"),
    "mlp_bias": boolean(False),
    "mamba_num_heads": integer(1, SIZE), "mamba_head_dim": integer(1, SIZE), "n_groups": integer(1, SIZE),
    "ssm_state_size": integer(1, 1024), "conv_kernel": integer(1, 64), "use_conv_bias": boolean(True),
    "use_bias": boolean(False),
    "n_routed_experts": integer(1, 4096, default=8), "num_experts_per_tok": integer(1, 4096, default=2),
    "moe_intermediate_size": integer(1, 16 * SIZE, default=None, nullable=True),
    "moe_shared_expert_intermediate_size": integer(1, 16 * SIZE, default=None, nullable=True),
    "moe_latent_size": integer(1, SIZE, default=None, nullable=True),
    "n_group": integer(1, 4096, default=1), "topk_group": integer(1, 4096, default=1),
    "norm_topk_prob": boolean(True), "routed_scaling_factor": number(0, 1e6, default=1.0, above=True),
}
JAMBA_SCHEMA = {
    **COMMON_SCHEMA,
    "num_hidden_layers": integer(1, 1024),
    "rms_norm_eps": number(0, 1, default=1e-6, above=True),
    "attn_layer_period": integer(1, 1024, default=8), "attn_layer_offset": integer(0, 1023, default=4),
    "expert_layer_period": integer(1, 1024, default=2), "expert_layer_offset": integer(0, 1023, default=1),
    "num_experts": integer(1, 4096, default=16), "num_experts_per_tok": integer(1, 4096, default=2),
    "mamba_d_state": integer(1, 1024), "mamba_d_conv": integer(1, 64), "mamba_expand": integer(1, 16),
    "mamba_dt_rank": integer(1, SIZE, special=("auto",)), "mamba_conv_bias": boolean(True),
    "mamba_proj_bias": boolean(False),
}
MULTIPLIER = number(0, 1e6, default=1.0, above=True)
FALCON_H1_SCHEMA = {
    **COMMON_SCHEMA,
    "num_hidden_layers": integer(1, 1024),
    "head_dim": integer(1, SIZE, default=None, nullable=True),
    "rms_norm_eps": number(0, 1, default=1e-5, above=True),
    "mlp_bias": boolean(False),
    "mamba_d_ssm": integer(1, 16 * SIZE, default=None, nullable=True), "mamba_expand": integer(1, 16, default=2),
    "mamba_n_heads": integer(1, SIZE), "mamba_d_head": integer(1, SIZE), "mamba_n_groups": integer(1, SIZE),
    "mamba_d_state": integer(1, 1024), "mamba_d_conv": integer(1, 64), "mamba_conv_bias": boolean(True),
    "mamba_proj_bias": boolean(False), "projectors_bias": boolean(False), "mamba_rms_norm": boolean(False),
    "mamba_norm_before_gate": boolean(True),
    **{name: MULTIPLIER for name in ("embedding_multiplier", "lm_head_multiplier", "attention_in_multiplier",
                                     "attention_out_multiplier", "key_multiplier", "ssm_in_multiplier",
                                     "ssm_out_multiplier")},
    "ssm_multipliers": list_of(MULTIPLIER, default=[1.0] * 5, min_items=5, max_items=5),
    "mlp_multipliers": list_of(MULTIPLIER, default=[1.0, 1.0], min_items=2, max_items=2),
}
ZAMBA2_SCHEMA = {
    **COMMON_SCHEMA,
    "tie_word_embeddings": boolean(True),
    "intermediate_size": integer(1, 16 * SIZE, default=None, nullable=True),
    "layers_block_type": list_of(string(*MAMBA_TYPES, "hybrid"), min_items=1, max_items=1024),
    "num_mem_blocks": integer(1, 1024, default=1),
    "use_shared_attention_adapter": boolean(False), "adapter_rank": integer(1, SIZE, default=128),
    "use_mem_rope": boolean(False),
    "rms_norm_eps": number(0, 1, default=1e-5, above=True),
    "hidden_act": string("gelu", default="gelu"),
    "add_bias_linear": boolean(False),
    "n_mamba_heads": integer(1, SIZE, default=8), "mamba_expand": integer(1, 16, default=2),
    "mamba_ngroups": integer(1, SIZE, default=1), "mamba_d_state": integer(1, 1024, default=64),
    "mamba_d_conv": integer(1, 64, default=4), "time_step_min": number(0, 1e6, default=0.001),
}
MODEL_TYPES = {"granitemoehybrid": GRANITE_SCHEMA, "bamba": BAMBA_SCHEMA, "nemotron_h": NEMOTRON_SCHEMA,
               "jamba": JAMBA_SCHEMA, "falcon_h1": FALCON_H1_SCHEMA, "zamba2": ZAMBA2_SCHEMA}
# Jamba's Mamba-1 names -> ours (runtime.mixer.MambaMixer)
JAMBA_MAMBA = {"in_proj": "in_proj", "out_proj": "out_proj", "conv1d": "ssm.conv1d", "x_proj": "ssm.x_proj",
               "dt_proj": "ssm.dt_proj", "A_log": "ssm.A_log", "D": "ssm.D", "dt_layernorm": "ssm.inner_norms.dt",
               "b_layernorm": "ssm.inner_norms.B", "c_layernorm": "ssm.inner_norms.C"}


def is_hybrid_config(config: dict) -> bool:
    return config.get("model_type") in MODEL_TYPES


def config_from_hf(values: dict, where: str) -> HybridLMConfig:
    """Our config of a transformers hybrid config.json (a dict), every field it reads checked."""
    model_type = values.get("model_type")
    c = validate(values, MODEL_TYPES[model_type], where)
    c["model_type"] = model_type
    return {"granitemoehybrid": granite_config, "bamba": bamba_config, "nemotron_h": nemotron_config,
            "jamba": jamba_config, "falcon_h1": falcon_h1_config, "zamba2": zamba2_config}[model_type](c, where)


def rope_theta(c: dict, where: str) -> tuple[float, float]:
    """(theta, rotary fraction) of transformers' default RoPE; another rope_type is refused."""
    rope = c["rope_parameters"] or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"{where}: rope_parameters.rope_type {rope.get('rope_type')!r}; expected 'default' (other "
                         "RoPE scalings are not in the runtime)")
    theta, fraction = rope.get("rope_theta", 10000.0), rope.get("partial_rotary_factor", 1.0)
    for name, value in (("rope_theta", theta), ("partial_rotary_factor", fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise InputError(f"{where}: rope_parameters.{name} must be a positive number, got {value!r}")
    if not 0 < fraction <= 1:
        raise InputError(f"{where}: rope_parameters.partial_rotary_factor {fraction}; expected a fraction in (0, 1]")
    return float(theta), float(fraction)


def mamba2_config(c: dict, heads: int, head_dim: int, groups: int, state: int, conv: int, conv_bias: bool,
                  bias: bool, eps: float, where: str, gated_norm: str = "after_gate") -> Mamba2Config:
    low, high = dt_limits(c["time_step_limit"], where, "time_step_limit")
    return Mamba2Config.from_dict(dict(d_model=c["hidden_size"], d_state=state, expand=1, inner_size=heads * head_dim,
                                       head_dim=head_dim, n_groups=groups, d_conv=conv, conv_bias=conv_bias,
                                       bias=bias, norm_eps=eps, dt_limit_min=low, dt_limit_max=high,
                                       gated_norm=gated_norm),
                                  where=f"{where} (its Mamba-2 layers)")


def attention_config(c: dict, where: str, **fields) -> AttentionConfig:
    values = dict(d_model=c["hidden_size"], n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"] or 0,
                  qkv_bias=c["attention_bias"], o_bias=c["attention_bias"])
    return AttentionConfig.from_dict(values | fields, where=f"{where} (its attention layers)")


def granite_config(c: dict, where: str) -> HybridLMConfig:
    kinds = ["mamba2" if kind in MAMBA_TYPES else "attention" for kind in c["layer_types"]]
    ffn = "moe" if c["num_local_experts"] else "mlp"
    theta, _ = rope_theta(c, where)
    mamba2 = mamba2_config(c, c["mamba_n_heads"], c["mamba_d_head"], c["mamba_n_groups"], c["mamba_d_state"],
                           c["mamba_d_conv"], c["mamba_conv_bias"], c["mamba_proj_bias"], c["rms_norm_eps"], where)
    attention = attention_config(c, where, rope=c["position_embedding_type"] == "rope", rope_theta=theta,
                                 scale=c["attention_multiplier"])
    mlp = MLPConfig.from_dict(dict(d_model=c["hidden_size"], d_ff=c["shared_intermediate_size"]), where=where)
    moe = None if ffn == "mlp" else MoEConfig.from_dict(
        dict(d_model=c["hidden_size"], d_ff=c["intermediate_size"], n_experts=c["num_local_experts"],
             top_k=c["num_experts_per_tok"], scoring="softmax", norm_topk_prob=True,
             shared_d_ff=c["shared_intermediate_size"]), where=f"{where} (its experts)")
    return HybridLMConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], blocks=[b for kind in kinds for b in (kind, ffn)],
        mamba2=mamba2 if "mamba2" in kinds else None, attention=attention if "attention" in kinds else None,
        mlp=mlp if ffn == "mlp" else None, moe=moe, norm_eps=c["rms_norm_eps"], tie_embeddings=c["tie_word_embeddings"],
        embedding_multiplier=c["embedding_multiplier"], residual_multiplier=c["residual_multiplier"],
        logits_divisor=c["logits_scaling"])


def bamba_config(c: dict, where: str) -> HybridLMConfig:
    layers, attention_layers = c["num_hidden_layers"], set(c["attn_layer_indices"] or ())
    outside = sorted(i for i in attention_layers if i >= layers)
    if outside:
        raise InputError(f"{where}: attn_layer_indices names layer {outside[0]}; expected indices below "
                         f"num_hidden_layers {layers}")
    kinds = ["attention" if i in attention_layers else "mamba2" for i in range(layers)]
    theta, fraction = rope_theta(c, where)
    return HybridLMConfig(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], blocks=[b for kind in kinds for b in (kind, "mlp")],
        mamba2=mamba2_config(c, c["mamba_n_heads"], c["mamba_d_head"], c["mamba_n_groups"], c["mamba_d_state"],
                             c["mamba_d_conv"], c["mamba_conv_bias"], c["mamba_proj_bias"], c["rms_norm_eps"], where)
        if "mamba2" in kinds else None,
        attention=attention_config(c, where, rope=True, rope_theta=theta, rotary_fraction=fraction)
        if "attention" in kinds else None,
        mlp=MLPConfig.from_dict(dict(d_model=c["hidden_size"], d_ff=c["intermediate_size"], bias=c["mlp_bias"]),
                                where=where),
        norm_eps=c["rms_norm_eps"], tie_embeddings=c["tie_word_embeddings"])


def nemotron_config(c: dict, where: str) -> HybridLMConfig:
    kinds = [NEMOTRON_KINDS[kind] for kind in c["layers_block_type"]]
    d_model = c["hidden_size"]
    layers = {
        "mamba2": lambda: mamba2_config(c, c["mamba_num_heads"], c["mamba_head_dim"], c["n_groups"],
                                        c["ssm_state_size"], c["conv_kernel"], c["use_conv_bias"], c["use_bias"],
                                        c["layer_norm_epsilon"], where),
        "attention": lambda: attention_config(c, where, rope=False, qkv_bias=False, o_bias=False,
                                              head_dim=c["head_dim"] or 0),
        "mlp": lambda: MLPConfig.from_dict(dict(d_model=d_model, d_ff=c["intermediate_size"], gated=False,
                                                activation="relu2", bias=c["mlp_bias"]), where=where),
        "moe": lambda: MoEConfig.from_dict(dict(
            d_model=d_model, d_ff=c["moe_intermediate_size"] or c["intermediate_size"],
            n_experts=c["n_routed_experts"], top_k=c["num_experts_per_tok"], scoring="sigmoid",
            norm_topk_prob=c["norm_topk_prob"], score_correction=True, n_group=c["n_group"],
            topk_group=c["topk_group"], routed_scaling_factor=c["routed_scaling_factor"], gated=False,
            activation="relu2", shared_d_ff=c["moe_shared_expert_intermediate_size"] or 0,
            latent_size=c["moe_latent_size"] or 0, bias=c["mlp_bias"]), where=f"{where} (its experts)"),
    }
    return HybridLMConfig(vocab_size=c["vocab_size"], d_model=d_model, blocks=kinds,
                          **{kind: layers[kind]() for kind in dict.fromkeys(kinds)},
                          norm_eps=c["layer_norm_epsilon"], tie_embeddings=False)


def jamba_config(c: dict, where: str) -> HybridLMConfig:
    """Attention where i % attn_layer_period == attn_layer_offset, Mamba-1 elsewhere; an MoE feed-forward where
    i % expert_layer_period == expert_layer_offset (with more than one expert), an MLP elsewhere."""
    d_model, layers = c["hidden_size"], range(c["num_hidden_layers"])
    kinds = ["attention" if i % c["attn_layer_period"] == c["attn_layer_offset"] else "mamba1" for i in layers]
    moe = c["num_experts"] > 1
    ffns = ["moe" if moe and i % c["expert_layer_period"] == c["expert_layer_offset"] else "mlp" for i in layers]
    dt_rank = math.ceil(d_model / 16) if c["mamba_dt_rank"] == "auto" else c["mamba_dt_rank"]
    parts = {
        "mamba1": lambda: MambaConfig.from_dict(dict(
            d_model=d_model, d_state=c["mamba_d_state"], expand=c["mamba_expand"], d_conv=c["mamba_d_conv"],
            dt_rank=dt_rank, conv_bias=c["mamba_conv_bias"], bias=c["mamba_proj_bias"], norm_eps=c["rms_norm_eps"],
            mixer_rms_eps=c["rms_norm_eps"], mixer_norm_weights=True), where=f"{where} (its Mamba layers)"),
        "attention": lambda: attention_config(c, where, rope=False, qkv_bias=False, o_bias=False),
        "mlp": lambda: MLPConfig.from_dict(dict(d_model=d_model, d_ff=c["intermediate_size"]), where=where),
        "moe": lambda: MoEConfig.from_dict(dict(d_model=d_model, d_ff=c["intermediate_size"],
                                                n_experts=c["num_experts"], top_k=c["num_experts_per_tok"],
                                                scoring="softmax", norm_topk_prob=False),
                                           where=f"{where} (its experts)"),
    }
    blocks = [b for kind, ffn in zip(kinds, ffns) for b in (kind, ffn)]
    return HybridLMConfig(vocab_size=c["vocab_size"], d_model=d_model, blocks=blocks,
                          **{kind: parts[kind]() for kind in dict.fromkeys(blocks)}, norm_eps=c["rms_norm_eps"],
                          tie_embeddings=c["tie_word_embeddings"])


def falcon_h1_config(c: dict, where: str) -> HybridLMConfig:
    """Every layer a Mamba-2 mixer beside attention, then an MLP. The multipliers around the two mixers are folded
    into their weights on loading (`fold_falcon_h1`); the key, MLP, embedding and logits multipliers stay in the
    runtime."""
    if c["mamba_proj_bias"] != c["projectors_bias"]:
        raise InputError(f"{where}: mamba_proj_bias {c['mamba_proj_bias']} and projectors_bias "
                         f"{c['projectors_bias']}; expected both the same (the runtime has one bias switch for the "
                         "Mamba projections)")
    d_ssm = c["mamba_d_ssm"] or c["mamba_expand"] * c["hidden_size"]
    if d_ssm != c["mamba_n_heads"] * c["mamba_d_head"]:
        raise InputError(f"{where}: mamba_d_ssm {d_ssm} is not mamba_n_heads x mamba_d_head = "
                         f"{c['mamba_n_heads']} x {c['mamba_d_head']}; expected them equal")
    theta, _ = rope_theta(c, where)
    mamba2 = mamba2_config(c, c["mamba_n_heads"], c["mamba_d_head"], c["mamba_n_groups"], c["mamba_d_state"],
                           c["mamba_d_conv"], c["mamba_conv_bias"], c["mamba_proj_bias"], c["rms_norm_eps"], where,
                           gated_norm="none" if not c["mamba_rms_norm"] else
                           "before_gate" if c["mamba_norm_before_gate"] else "after_gate")
    attention = attention_config(c, where, rope=True, rope_theta=theta, head_dim=c["head_dim"] or 0,
                                 key_multiplier=c["key_multiplier"])
    gate, down = c["mlp_multipliers"]
    mlp = MLPConfig.from_dict(dict(d_model=c["hidden_size"], d_ff=c["intermediate_size"], bias=c["mlp_bias"],
                                   gate_multiplier=gate, down_multiplier=down), where=where)
    return HybridLMConfig(vocab_size=c["vocab_size"], d_model=c["hidden_size"],
                          blocks=["parallel", "mlp"] * c["num_hidden_layers"], mamba2=mamba2, attention=attention,
                          mlp=mlp, norm_eps=c["rms_norm_eps"], tie_embeddings=c["tie_word_embeddings"],
                          embedding_multiplier=c["embedding_multiplier"],
                          logits_divisor=1.0 / c["lm_head_multiplier"])


def zamba2_config(c: dict, where: str) -> HybridLMConfig:
    """Mamba-2 layers and hybrid layers (a shared attention and MLP block feeding the Mamba-2 mixer's input), the
    hybrid layers taking turns among num_mem_blocks shared blocks. The attention reads 2 x hidden_size channels,
    heads of 2 x hidden_size / num_attention_heads, scaled by (head_dim / 2)^-0.5; dt is clamped below at
    time_step_min; the gated norm's eps is 1e-5 whatever rms_norm_eps says."""
    d_model, heads = c["hidden_size"], c["n_mamba_heads"]
    d_ssm = c["mamba_expand"] * d_model
    if d_ssm % heads:
        raise InputError(f"{where}: mamba_expand x hidden_size = {d_ssm} does not split into n_mamba_heads {heads} "
                         "heads; expected n_mamba_heads to divide it")
    if 2 * d_model % c["num_attention_heads"]:
        raise InputError(f"{where}: the attention input, 2 x hidden_size = {2 * d_model}, does not split into "
                         f"num_attention_heads {c['num_attention_heads']} heads; expected a divisor of it")
    kinds = ["zamba_hybrid" if kind == "hybrid" else "mamba2" for kind in c["layers_block_type"]]
    hybrid = "zamba_hybrid" in kinds
    theta, _ = rope_theta(c, where)  # Zamba2's RoPE turns every channel of a head, whatever partial_rotary_factor says
    head_dim = 2 * d_model // c["num_attention_heads"]
    mamba2 = mamba2_config({**c, "time_step_limit": [c["time_step_min"], math.inf]}, heads, d_ssm // heads,
                           c["mamba_ngroups"], c["mamba_d_state"], c["mamba_d_conv"], True, c["add_bias_linear"],
                           1e-5, where)
    attention = attention_config(c, where, input_size=2 * d_model, head_dim=head_dim, scale=(head_dim / 2) ** -0.5,
                                 rope=c["use_mem_rope"], rope_theta=theta, qkv_bias=False,
                                 o_bias=False, adapter_rank=c["adapter_rank"] if c["use_shared_attention_adapter"]
                                 else 0)
    mlp = MLPConfig.from_dict(dict(d_model=d_model, d_ff=c["intermediate_size"] or 4 * d_model, activation="gelu",
                                   bias=c["add_bias_linear"], adapter_rank=c["adapter_rank"]), where=where)
    return HybridLMConfig(vocab_size=c["vocab_size"], d_model=d_model, blocks=kinds, mamba2=mamba2,
                          attention=attention if hybrid else None, mlp=mlp if hybrid else None,
                          norm_eps=c["rms_norm_eps"], tie_embeddings=c["tie_word_embeddings"],
                          shared_blocks=c["num_mem_blocks"])


def fold_falcon_h1(c: dict, config: HybridLMConfig, weights: dict) -> dict:
    """Falcon-H1's multipliers around its mixers, folded into the weights they scale (the same function):
    ssm_in_multiplier scales in_proj's input and the mup vector (ssm_multipliers over in_proj's z, x, B, C and dt
    rows) its output, ssm_out_multiplier out_proj's output, attention_in_multiplier the input of q, k and v (their
    weights, not their biases), attention_out_multiplier o_proj's output."""
    m = config.mamba2
    sizes = [m.d_ssm, m.d_ssm, m.n_groups * m.d_state, m.n_groups * m.d_state, m.n_heads]
    mup = torch.cat([torch.full((size,), float(scale)) for size, scale in zip(sizes, c["ssm_multipliers"])])
    scales = {"mixer.mamba.in_proj.weight": lambda t: t * mup[:, None] * c["ssm_in_multiplier"],
              "mixer.mamba.in_proj.bias": lambda t: t * mup,
              "mixer.mamba.out_proj.weight": lambda t: t * c["ssm_out_multiplier"],
              "mixer.mamba.out_proj.bias": lambda t: t * c["ssm_out_multiplier"],
              **{f"mixer.attention.{part}_proj.weight": lambda t: t * c["attention_in_multiplier"] for part in "qkv"},
              "mixer.attention.o_proj.weight": lambda t: t * c["attention_out_multiplier"],
              "mixer.attention.o_proj.bias": lambda t: t * c["attention_out_multiplier"]}
    folded = {}
    for name, (original, tensor) in weights.items():
        suffix = name.split(".", 2)[-1]  # past "layers.N."
        scale = scales.get(suffix) if name.startswith("layers.") else None
        folded[name] = (original, scale(tensor.float()) if scale is not None else tensor)
    return folded


def runtime_weights(model_type: str, config: HybridLMConfig, tensors: dict, source: str) -> dict:
    """{our name: (checkpoint name, tensor)} of a hybrid checkpoint's tensors (on disk or in transformers' memory
    names), every block's part found where its model keeps it."""
    weights = end_weights(config, tensors, source)
    for index in range(config.n_layer):
        weights |= block_weights(model_type, config, tensors, index, source)
    return weights


def backbone_of(tensors) -> str:
    return "backbone." if any(name.startswith("backbone.") for name in tensors) else "model."


def end_weights(config: HybridLMConfig, tensors: dict, source: str) -> dict:
    """The embedding, the final norm and an untied head."""
    backbone = backbone_of(tensors)
    embedding = next((backbone + name for name in ("embed_tokens.weight", "embeddings.weight")
                      if backbone + name in tensors), backbone + "embed_tokens.weight")
    final = next((backbone + name for name in ("norm.weight", "final_layernorm.weight", "norm_f.weight")
                  if backbone + name in tensors), backbone + "norm.weight")
    weights = {"embedding.weight": (embedding, take(tensors, embedding, source)),
               "norm_f.weight": (final, take(tensors, final, source))}
    if not config.tie_embeddings:
        weights["lm_head.weight"] = ("lm_head.weight", take(tensors, "lm_head.weight", source))
    elif "lm_head.weight" in tensors:  # transformers' state dict names the tied head too
        if tensors["lm_head.weight"].device.type != "meta" and \
                not torch.equal(tensors["lm_head.weight"], weights["embedding.weight"][1]):
            raise InputError(f"{source}: lm_head.weight differs from {embedding}, and the config ties them "
                             "(tie_word_embeddings); expected equal tensors or tie_word_embeddings false")
        weights["lm_head.weight"] = ("lm_head.weight", tensors["lm_head.weight"])
    return weights


def checkpoint_layer(model_type: str, tensors, index: int) -> str:
    """The checkpoint's prefix of the layer holding block `index` (two of our blocks per layer in the models
    whose layers have a mixer and a feed-forward sublayer)."""
    sublayers = 1 if model_type in ("nemotron_h", "zamba2") else 2
    return f"{backbone_of(tensors)}layers.{index // sublayers}."


def block_weights(model_type: str, config: HybridLMConfig, tensors: dict, index: int, source: str) -> dict:
    """Block `index`'s tensors (Zamba2's shared block and `linear` included)."""
    kind, layer, ours = config.blocks[index], checkpoint_layer(model_type, tensors, index), f"layers.{index}."
    if model_type == "nemotron_h":
        norm, mixer, shared = layer + "norm.weight", layer + "mixer.", None
    elif model_type == "zamba2":
        decoder = layer + ("mamba_decoder." if kind == "zamba_hybrid" else "")
        norm, mixer = decoder + "input_layernorm.weight", decoder + "mamba."
    elif index % 2 == 0:
        norm = layer + "input_layernorm.weight"
        mixer = layer + ("self_attn." if kind == "attention" else "" if kind == "parallel" else "mamba.")
    else:
        norm = layer + ("post_attention_layernorm.weight" if model_type == "granitemoehybrid" else
                        "pre_ff_layernorm.weight")
        granite = {"moe": "block_sparse_moe.", "mlp": "shared_mlp."}
        mixer = layer + (granite[kind] if model_type == "granitemoehybrid" else "feed_forward.")
        shared = layer + "shared_mlp."
    weights = {ours + "norm.weight": (norm, take(tensors, norm, source))}
    if kind in ("mamba2", "zamba_hybrid"):
        parts = mamba2_weights(tensors, mixer)
    elif kind == "parallel":
        parts = {**{"mamba." + name: value for name, value in mamba2_weights(tensors, mixer + "mamba.").items()},
                 **{"attention." + name: value
                    for name, value in attention_weights(tensors, mixer + "self_attn.", source=source).items()}}
    elif kind == "mamba1":
        parts = {JAMBA_MAMBA[module] + dot + rest: (name, tensor) for name, tensor in tensors.items()
                 if name.startswith(mixer) for module, dot, rest in [name[len(mixer):].partition(".")]
                 if module in JAMBA_MAMBA}
    elif kind == "attention":
        parts = attention_weights(tensors, mixer, source=source)
    elif kind == "mlp":
        parts = mlp_weights(tensors, mixer, source=source)
    else:
        parts = moe_weights(tensors, mixer, shared, source=source)
    weights |= {ours + "mixer." + name: value for name, value in parts.items()}
    for slot, (hybrid_index, owner) in enumerate(config.shared_owners()):
        if hybrid_index == index:
            weights |= zamba_shared_weights(config, tensors, slot, index, owner, source)
    return weights


def zamba_shared_weights(config: HybridLMConfig, tensors: dict, slot: int, index: int, owner: int,
                         source: str) -> dict:
    """Zamba2's layer `index`, hybrid layer number `slot`: its `linear`, and its shared block as the block's first
    layer `owner` holds it, with the adapters of `slot`."""
    block = f"model.layers.{owner}.shared_transformer."
    attention = attention_weights(tensors, block + "self_attn.", adapter=slot if config.attention.adapter_rank
                                  else None, source=source)
    mlp = mlp_weights(tensors, block + "feed_forward.", adapter=slot, source=source)
    parts = {"norm.weight": block + "input_layernorm.weight", "ff_norm.weight": block + "pre_ff_layernorm.weight"}
    return {f"layers.{index}.linear.weight": (f"model.layers.{index}.linear.weight",
                                              take(tensors, f"model.layers.{index}.linear.weight", source)),
            **{f"layers.{index}.shared.{ours}": (name, take(tensors, name, source)) for ours, name in parts.items()},
            **{f"layers.{index}.shared.attention.{name}": value for name, value in attention.items()},
            **{f"layers.{index}.shared.mlp.{name}": value for name, value in mlp.items()}}


def without_tied_copies(config: HybridLMConfig, tensors: dict, source: str) -> dict:
    """Zamba2's tensors less the copies that transformers' state dict holds of a shared block under every hybrid
    layer using it (save_pretrained writes each block once, under its first layer). A copy that differs from the
    block is refused: our layers share one set of weights."""
    copies = {f"model.layers.{index}.shared_transformer.": f"model.layers.{owner}.shared_transformer."
              for index, owner in config.shared_owners() if index != owner}
    kept = {}
    for name, tensor in tensors.items():
        prefix = next((prefix for prefix in copies if name.startswith(prefix)), None)
        original = None if prefix is None else copies[prefix] + name[len(prefix):]
        if original not in tensors:
            kept[name] = tensor
        elif not torch.equal(tensor, tensors[original]):
            raise InputError(f"{source}: {name} differs from {original}, and Zamba2's layers share that block "
                             "(num_mem_blocks); expected equal tensors")
    return kept


def mamba2_weights(tensors: dict, prefix: str) -> dict:
    """A Mamba-2 mixer's tensors, named as ours (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj)."""
    return {name[len(prefix):]: (name, tensor) for name, tensor in tensors.items() if name.startswith(prefix)}


def take(tensors: dict, name: str, source: str) -> torch.Tensor:
    if name not in tensors:
        raise InputError(f"{source}: missing weight {name}")
    return tensors[name]


def used_names(tensors) -> set[str]:
    return {name for name in tensors if not name.startswith("mtp.")}  # Nemotron-H's multi-token prediction layers


def folded(values: dict, config: HybridLMConfig, weights: dict, source: str) -> dict:
    """`weights` with Falcon-H1's multipliers folded in (`fold_falcon_h1`); any other model's as they are."""
    if values["model_type"] != "falcon_h1":
        return weights
    return fold_falcon_h1(validate(values, FALCON_H1_SCHEMA, source), config, weights)


def build_loaded(config: HybridLMConfig, values: dict, tensors: dict, source: str) -> MambaLM:
    model_type = values["model_type"]
    if model_type == "zamba2":
        tensors = without_tied_copies(config, tensors, source)
    used = used_names(tensors)
    weights = folded(values, config, runtime_weights(model_type, config, {name: tensors[name] for name in used},
                                                     source), source)
    consumed = {original.split("[")[0] for original, _ in weights.values() if "*" not in original}
    unused = sorted(used - consumed - expert_names(weights, used))
    if unused:
        raise InputError(f"{source}: unexpected weight(s) {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''} "
                         "for this architecture")
    return assign_weights(MambaLM(config), weights, source).eval()


def expert_names(weights: dict, names: set[str]) -> set[str]:
    """The per-expert checkpoint names a stacked expert tensor was built from (`NAME.experts.*.PART`)."""
    patterns = [original for original, _ in weights.values() if "*" in original]
    return {name for name in names for pattern in patterns
            if name.startswith(pattern.split("*")[0]) and name.endswith(pattern.split("*")[1])}


class BlockReader:
    """A hybrid checkpoint in its own model's layout, read one block at a time for a streamed walk: `weights` maps
    every runtime name to (checkpoint name, a meta tensor of its shape) without reading anything; `block(index)`
    reads the checkpoint layer holding that block and maps its tensors as loading does (split, stacked, folded)."""

    def __init__(self, values: dict, config: HybridLMConfig, checkpoint: Checkpoint, source: str):
        self.values, self.config, self.checkpoint, self.source = values, config, checkpoint, source
        self.model_type = values["model_type"]
        used = used_names(checkpoint.infos)
        shapes = {name: torch.empty(info.shape, dtype=info.dtype, device="meta")
                  for name, info in checkpoint.infos.items() if name in used}
        self.weights = runtime_weights(self.model_type, config, shapes, source)  # (folding changes no shape)

    def ends(self) -> dict:
        """The embedding, the final norm and an untied head."""
        layers = f"{backbone_of(self.checkpoint.infos)}layers."
        names = [name for name in used_names(self.checkpoint.infos) if not name.startswith(layers)]
        return end_weights(self.config, self.checkpoint.read_names(names), self.source)

    def block(self, index: int) -> dict:
        """{name within the block: (checkpoint name, tensor)}."""
        prefixes = [checkpoint_layer(self.model_type, self.checkpoint.infos, index)]
        owner = dict(self.config.shared_owners()).get(index, index)
        if owner != index:  # a Zamba2 hybrid layer: its shared block is held by an earlier one
            prefixes.append(checkpoint_layer(self.model_type, self.checkpoint.infos, owner) + "shared_transformer.")
        tensors = self.checkpoint.read_names([name for name in self.checkpoint.infos
                                              if name.startswith(tuple(prefixes))])
        weights = folded(self.values, self.config, block_weights(self.model_type, self.config, tensors, index,
                                                                 self.source), self.source)
        ours = f"layers.{index}."
        return {name[len(ours):]: value for name, value in weights.items()}


def load_hybrid(values: dict, checkpoint: Checkpoint, source: str, where: str) -> MambaLM:
    """A hybrid model from its config.json (a dict) and checkpoint: memory checked on the meta device first."""
    config = config_from_hf(values, where)
    with on_meta_device():
        skeleton = MambaLM(config)
    check_memory(skeleton, checkpoint.nbytes, source)
    return build_loaded(config, values, checkpoint.read(), source)


def from_transformers(hf_model: nn.Module) -> MambaLM:
    """An in-memory transformers hybrid (GraniteMoeHybridForCausalLM, BambaForCausalLM, NemotronHForCausalLM,
    JambaForCausalLM, FalconH1ForCausalLM, Zamba2ForCausalLM) -> our runtime, same weights."""
    where = type(hf_model).__name__
    values = hf_model.config.to_dict()
    values["time_step_limit"] = [float(v) for v in values.get("time_step_limit", (0.0, math.inf))]
    config = config_from_hf(values, where)
    return build_loaded(config, values, {k: v.detach() for k, v in hf_model.state_dict().items()}, where)
