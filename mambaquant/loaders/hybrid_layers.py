"""The weights of a hybrid model's attention, MLP and MoE layers, from a checkpoint's names to our modules'
(runtime.attention.Attention, runtime.mlp.MLP, runtime.moe.MoE).

Each function takes the checkpoint's tensors by name and one layer's prefix among them (e.g.
"model.layers.4.self_attn.") and gives {our name within the layer: (checkpoint name, tensor)}: prefixed with the
layer's path in our model, the form `weights.assign_weights` takes. Fused tensors are split and per-expert ones
stacked; the checkpoint name then says which part ("NAME[first half of dim 0]", "PREFIXexperts.*.up_proj.weight").
The layouts on disk and transformers' module names are both read where they differ (experts; docs/hybrids.md)."""

import re
from collections.abc import Mapping

import torch

from ..errors import InputError

Tensors = Mapping[str, torch.Tensor]
Mapped = dict[str, tuple[str, torch.Tensor]]


def attention_weights(tensors: Tensors, prefix: str, adapter: int | None = None, source: str = "checkpoint") -> Mapped:
    """q_proj, k_proj, v_proj, o_proj (weights, and biases where the checkpoint has them). `adapter`: Zamba2's
    index of this layer among the hybrid layers, whose linear_{q,k,v}_adapter_list entries are its adapters."""
    mapped = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        mapped |= linear(tensors, prefix + name, name, source)
    if adapter is not None:
        for part in "qkv":
            mapped |= adapter_weights(tensors, f"{prefix}linear_{part}_adapter_list.{adapter}.", f"{part}_adapter.",
                                      source)
    return mapped


def mlp_weights(tensors: Tensors, prefix: str, adapter: int | None = None, source: str = "checkpoint") -> Mapped:
    """An MLP stored as
    - gate_proj, up_proj, down_proj (Bamba, Jamba, Falcon-H1), or up_proj, down_proj without a gate (Nemotron-H);
    - input_linear = [gate; up] by rows, output_linear (GraniteMoeHybrid's shared_mlp);
    - gate_up_proj = [gate; up] by rows, down_proj (Zamba2; `adapter`: this layer's index in
      gate_up_proj_adapter_list)."""
    for fused, down in (("input_linear", "output_linear"), ("gate_up_proj", "down_proj")):
        if f"{prefix}{fused}.weight" in tensors:
            mapped = {}
            for kind in ("weight", "bias"):
                name = f"{prefix}{fused}.{kind}"
                if name in tensors:
                    mapped[f"gate_proj.{kind}"], mapped[f"up_proj.{kind}"] = halves(name, tensors[name], dim=0)
            mapped |= linear(tensors, prefix + down, "down_proj", source)
            break
    else:
        gated = prefix + "gate_proj.weight" in tensors
        mapped = {}
        for name in ("gate_proj",) * gated + ("up_proj", "down_proj"):
            mapped |= linear(tensors, prefix + name, name, source)
    if adapter is not None:
        mapped |= adapter_weights(tensors, f"{prefix}gate_up_proj_adapter_list.{adapter}.", "adapter.", source)
    return mapped


def moe_weights(tensors: Tensors, prefix: str, shared_prefix: str | None = None, source: str = "checkpoint") -> Mapped:
    """A mixture of experts under `prefix`:
    - router: router.weight (Jamba; GraniteMoeHybrid in transformers), router.layer.weight (GraniteMoeHybrid on
      disk), gate.weight with gate.e_score_correction_bias (Nemotron-H);
    - experts stacked: experts.gate_up_proj (E, 2F, W) = [gate; up] along dim 1 and experts.down_proj (E, W, F)
      (transformers: GraniteMoeHybrid, Jamba), input_linear.weight and output_linear.weight alike
      (GraniteMoeHybrid on disk), experts.up_proj (E, F, W) and experts.down_proj without a gate (transformers:
      Nemotron-H);
    - or one expert per name, experts.{e}.gate_proj.weight (if gated), .up_proj.weight, .down_proj.weight (on disk:
      Jamba, Nemotron-H);
    - fc1_latent_proj, fc2_latent_proj (Nemotron-H's latent MoE) where there;
    - a shared expert, an MLP (see `mlp_weights`) under `shared_prefix`, by default PREFIXshared_experts.
      (Nemotron-H); GraniteMoeHybrid's is the layer's shared_mlp., beside the MoE."""
    router = next((name for name in ("router.weight", "router.layer.weight", "gate.weight")
                   if prefix + name in tensors), None)
    if router is None:
        raise InputError(f"{source}: missing weight {prefix}router.weight (or router.layer.weight, gate.weight)")
    mapped = {"router.weight": (prefix + router, tensors[prefix + router])}
    if prefix + "gate.e_score_correction_bias" in tensors:
        name = prefix + "gate.e_score_correction_bias"
        mapped["router.score_correction_bias"] = (name, tensors[name])
    mapped |= expert_weights(tensors, prefix, source)
    for name in ("fc1_latent_proj", "fc2_latent_proj"):
        if f"{prefix}{name}.weight" in tensors:
            mapped |= linear(tensors, prefix + name, name, source)
    shared_prefix = prefix + "shared_experts." if shared_prefix is None else shared_prefix
    if any(name.startswith(shared_prefix) for name in tensors):
        shared = mlp_weights(tensors, shared_prefix, source=source)
        mapped |= {"shared_expert." + name: value for name, value in shared.items()}
    return mapped


def expert_weights(tensors: Tensors, prefix: str, source: str) -> Mapped:
    for fused, down in (("experts.gate_up_proj", "experts.down_proj"), ("input_linear.weight", "output_linear.weight")):
        if prefix + fused in tensors:
            gate, up = halves(prefix + fused, tensors[prefix + fused], dim=1)
            return {"experts.gate_proj": gate, "experts.up_proj": up,
                    "experts.down_proj": (prefix + down, take(tensors, prefix + down, source))}
    if prefix + "experts.up_proj" in tensors:
        return {f"experts.{part}": (f"{prefix}experts.{part}", take(tensors, f"{prefix}experts.{part}", source))
                for part in ("up_proj", "down_proj")}
    count = expert_count(tensors, prefix, source)
    parts = ("gate_proj",) * (prefix + "experts.0.gate_proj.weight" in tensors) + ("up_proj", "down_proj")
    return {f"experts.{part}": (f"{prefix}experts.*.{part}.weight",
                                torch.stack([take(tensors, f"{prefix}experts.{e}.{part}.weight", source)
                                             for e in range(count)]))
            for part in parts}


def expert_count(tensors: Tensors, prefix: str, source: str) -> int:
    """The number of experts stored one per name, numbered 0..n-1."""
    pattern = re.compile(re.escape(prefix) + r"experts\.(\d+)\.up_proj\.weight")
    numbers = {int(match.group(1)) for match in map(pattern.fullmatch, tensors) if match}
    if not numbers:
        raise InputError(f"{source}: missing the experts of {prefix.rstrip('.')}: expected "
                         f"{prefix}experts.gate_up_proj, {prefix}input_linear.weight, {prefix}experts.up_proj or "
                         f"{prefix}experts.0.up_proj.weight")
    if numbers != set(range(len(numbers))):
        missing = min(set(range(max(numbers) + 1)) - numbers)
        raise InputError(f"{source}: missing weight {prefix}experts.{missing}.up_proj.weight; expected experts "
                         f"numbered 0 to {max(numbers)}")
    return len(numbers)


def linear(tensors: Tensors, name: str, ours: str, source: str) -> Mapped:
    """A linear's weight (required) and bias (where the checkpoint has one), under our name for the linear."""
    mapped = {f"{ours}.weight": (f"{name}.weight", take(tensors, f"{name}.weight", source))}
    if f"{name}.bias" in tensors:
        mapped[f"{ours}.bias"] = (f"{name}.bias", tensors[f"{name}.bias"])
    return mapped


def adapter_weights(tensors: Tensors, prefix: str, ours: str, source: str) -> Mapped:
    """A Zamba2 adapter, an nn.Sequential of two linears without biases: PREFIX0 (down) and PREFIX1 (up)."""
    return {f"{ours}{part}.weight": (f"{prefix}{index}.weight", take(tensors, f"{prefix}{index}.weight", source))
            for index, part in ((0, "down"), (1, "up"))}


def halves(name: str, tensor: torch.Tensor, dim: int) -> tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]]:
    """A fused [first; second] tensor cut in two along `dim`, each half named by its place in the original."""
    size = tensor.shape[dim] // 2
    first, second = tensor.narrow(dim, 0, size), tensor.narrow(dim, size, size)
    return (f"{name}[first half of dim {dim}]", first), (f"{name}[second half of dim {dim}]", second)


def take(tensors: Tensors, name: str, source: str) -> torch.Tensor:
    if name not in tensors:
        raise InputError(f"{source}: missing weight {name}")
    return tensors[name]
