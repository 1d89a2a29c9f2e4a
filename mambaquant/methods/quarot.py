"""QuaRot: norm fusion and a randomised Hadamard on the residual stream (through every layer kind: each reads and
writes it), then per layer: in a Mamba-1 layer Hadamards on the dt path, the state dimension and the out_proj and
x_proj inputs; in a Mamba-2 layer an online Hadamard at the out_proj input (its C passes a SiLU after the conv, so
a Hadamard on the state dimension fuses nowhere and is left out); in attention a Hadamard per value head, offline
in v_proj and o_proj, and for a quantized KV cache (`kv_bits`) a Hadamard per query and key head; an online
Hadamard at every MLP's down_proj input (each expert's too). Its weights are rounded by GPTQ (`WEIGHT_ROUNDING`)."""

from ..transforms.rotation import (Rotate, branches, fuse_norms, online_hadamard, random_hadamard, rotate_down_input,
                                   rotate_dt_path, rotate_heads, rotate_linear_input, rotate_out_proj_input,
                                   rotate_queries_keys, rotate_residual, rotate_state)
from .config import FULL_PRECISION, QuantConfig, QuantReport
from .stages import Runner, by_layer_kind, fused_offline, layer_kinds, no_op

PER_LAYER = {  # what quarot does in each kind of layer: (with online transforms, without)
    "mamba1": ("randomised Hadamard on the dt path (offline), Hadamard on the state dimension (C offline, h online), "
               "online Hadamard at out_proj and x_proj inputs", "randomised Hadamard on the dt path (offline)"),
    "mamba2": ("online Hadamard at out_proj input", "nothing"),
    "attention": ("randomised Hadamard per value head (offline in v_proj and o_proj)",) * 2,
    "mlp": ("online Hadamard at down_proj input", "nothing"),
    "moe": ("online Hadamard at each expert's down_proj input (and the latent fc2's)", "nothing"),
}


KV_CACHE_ROTATION = ("Hadamard per query and key head for the KV cache (online after RoPE, offline in q_proj's and "
                     "k_proj's rows without RoPE)")


def per_layer_lines(table: dict, model, config: QuantConfig, vllm_table: dict | None = None) -> str:
    """What a recipe does per layer kind: with online transforms, without (llama.cpp), or for vLLM (its own line in
    `vllm_table` where it has one, else the line without online transforms); with the KV cache's rotation where
    kv_bits is set."""
    lines = []
    for kind in layer_kinds(model):
        if config.target == "vllm" and vllm_table is not None:
            line = vllm_table.get(kind, table[kind][-1])
        else:
            line = table[kind][0 if config.online_transforms else -1]
        if kind == "attention" and config.kv_bits != FULL_PRECISION:
            line += f", {KV_CACHE_ROTATION}"
        lines.append(f"{kind}: {line}")
    return "; ".join(lines)


VLLM = {"mamba2": "online Hadamard at out_proj input", "mlp": "online Hadamard at down_proj input"}


def quarot_model(model, blocks, batches, config: QuantConfig, report: QuantReport) -> None:
    fuse_norms(model, blocks.edit, untie=not config.online_transforms)
    rotate_residual(model, random_hadamard(model.config.d_model, config.seed), blocks.edit)
    report.transforms.append("norm fusion; randomised Hadamard on the residual stream (offline); per layer: "
                             + per_layer_lines(PER_LAYER, model, config, VLLM))


def quarot_mamba2(layer, mixer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    if config.online_input_hadamards:
        rotate_out_proj_input(mixer)


def quarot_mamba1(layer, mixer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    if config.online_transforms:
        rotate_out_proj_input(mixer)
    for ssm in branches(mixer):
        if config.online_transforms:
            rotate_linear_input(ssm.sites["x_proj_in"], ssm.x_proj, Rotate(ssm.x_proj.in_features))
        if fused_offline(ssm, config):
            rotate_dt_path(ssm, random_hadamard(ssm.dt_rank, config.seed + 1))
        if config.online_transforms:
            rotate_state(ssm, random_hadamard(ssm.d_state, config.seed + 2))


def quarot_attention(layer, attention, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    rotate_heads(attention, random_hadamard(attention.config.head_dim, config.seed + 3))
    if config.kv_bits != FULL_PRECISION:
        rotate_queries_keys(attention, config.seed + 6)


def quarot_mlp(layer, mlp, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    if config.online_input_hadamards:
        rotate_down_input(mlp, config.seed + 4)


def quarot_moe(layer, moe, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    for mlp in moe.mlps():
        quarot_mlp(layer, mlp, runner, config, report)
    if moe.fc2_latent_proj is not None and config.online_transforms:
        rotate_linear_input(moe.sites["fc2_latent_in"], moe.fc2_latent_proj,
                            online_hadamard(moe.fc2_latent_proj.in_features, config.seed + 5))


RECIPE = (quarot_model, by_layer_kind(mamba1=quarot_mamba1, mamba2=quarot_mamba2, attention=quarot_attention,
                                      mlp=quarot_mlp, moe=quarot_moe), no_op)
