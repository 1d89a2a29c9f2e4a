"""What vLLM executes, as rules the walk follows for `target="vllm"` and the compressed-tensors exporter checks.

vLLM serves Mamba-2 language models (`mamba2`) and the hybrids built from Mamba-2, attention and MLP blocks
(`nemotron_h`) from compressed-tensors checkpoints. Its Mamba-2 mixer builds in_proj and out_proj with the
checkpoint's quantization (the conv, the scan, its state and the gated norm stay in the model dtype); its attention
and MLP blocks build q/k/v/o_proj and up/down_proj with it; its Mamba-1 mixer (and FalconMamba's) builds every
linear without one, and the LM head is left unquantized here. A quantized linear holds:
- int8 weights per output channel with int8 inputs: static per tensor (one `input_scale` calibrated here) or dynamic
  per token (W8A8); or int8 / int4 weights per output channel or per group with float inputs (W8A16, W4A16);
- int4 weights only where the output width is a multiple of `W4_OUTPUT_MULTIPLE` (vLLM's 4-bit kernels: 32 on the
  CPU, 64 for Marlin on GPUs; we take 64 so an export runs on both): Mamba-2's fused in_proj (2 d_inner + 2 G N + H)
  rarely is, and keeps int8 weights in a W4A16 recipe, said in the report (Marlin runs int8 weight-only layers on
  GPUs; vLLM's CPU build has no kernel for them);
- an online input transform (compressed-tensors' `transform_config`: x -> x M before the input is quantized) at the
  input of a Mamba-2 out_proj and of an MLP's down_proj, one matrix per transform scheme for the whole model.
Every other transform of a recipe is fused offline into the float weights or left out."""

from torch import nn

from ..quant.linear import QuantizedEmbedding, QuantizedLinear
from ..runtime import HybridLMConfig, Mamba2LMConfig, MambaLM, Site
from ..transforms.rotation import Rotate
from .rules import module_problems

ENGINE = "vllm"
BLOCK_KINDS = ("mamba2", "attention", "mlp")  # the hybrid blocks exported (as nemotron_h)
W4_OUTPUT_MULTIPLE = 64
# the sites where vLLM applies an online input transform: (site kind, the linear reading it)
TRANSFORM_SITES = {"out_proj_in": "out_proj", "down_in": "down_proj"}


def input_quantizer_ok(quantizer) -> bool:
    """Whether vLLM quantizes a linear's input as `quantizer` does: int8 symmetric, static per tensor (one scale)
    or dynamic per token (not clipped: vLLM's per-token scale is the token's whole range). A static one clamps its
    codes to [-128, 127] as vLLM's does (`full_range`)."""
    s = quantizer.spec
    return s.bits == 8 and s.symmetric and not s.half_scales and (
        (s.granularity == "tensor" and not s.dynamic and s.full_range) or
        (s.granularity == "token" and s.dynamic and s.clip == 1))


def weight_bits(linear: nn.Module, w_bits: int) -> int:
    """The weight bits vLLM can hold for this linear in a recipe of `w_bits`: 4 only where its output width is a
    multiple of `W4_OUTPUT_MULTIPLE`, else 8."""
    return 8 if w_bits == 4 and linear.out_features % W4_OUTPUT_MULTIPLE else w_bits


def engine_slots(slots: list, head: set) -> list:
    """The (owner, attribute, input site) slots whose linear vLLM holds quantized: every block linear, not the head
    (`head`: the ids of the head's linears)."""
    return [slot for slot in slots if id(getattr(slot[0], slot[1])) not in head]


def architecture_problems(model: nn.Module) -> list[str]:
    """Why vLLM cannot serve this model quantized as we simulate it (empty: it can)."""
    if not isinstance(model, MambaLM):
        return [f"a {type(model).__name__} (vLLM serves language models: Mamba-2, and hybrids of Mamba-2, attention "
                "and MLP blocks)"]
    c = model.config
    if isinstance(c, HybridLMConfig):
        other = [kind for kind in dict.fromkeys(c.blocks) if kind not in BLOCK_KINDS]
        if other:
            why = {"mamba1": "vLLM builds Mamba-1 mixers without quantization",
                   "moe": "mixture-of-experts blocks are not exported yet",
                   "parallel": "Falcon-H1's parallel blocks are not exported yet",
                   "zamba_hybrid": "Zamba2's shared blocks are not exported yet"}
            return [f"{kind} blocks ({why.get(kind, 'not exported')})" for kind in other]
        problems = []
        if (c.embedding_multiplier, c.residual_multiplier, c.logits_divisor) != (1.0, 1.0, 1.0):
            problems.append("Granite's multipliers (exported as nemotron_h, which has none)")
        if c.mamba2 is not None:
            problems += mamba2_problems(c.mamba2)
        if c.attention is not None:
            a = c.attention
            if a.rope or a.qkv_bias or a.o_bias or a.adapter_rank or a.key_multiplier != 1 or \
                    a.input_size != c.d_model or abs(a.scale - a.head_dim ** -0.5) > 1e-6:
                problems.append("attention other than Nemotron-H's (no RoPE, no biases, scale 1/sqrt(head_dim))")
        if c.mlp is not None:
            m = c.mlp
            if m.gated or m.activation != "relu2" or m.adapter_rank or (m.gate_multiplier, m.down_multiplier) != (1, 1):
                problems.append(f"an MLP other than Nemotron-H's (relu2, no gate; this one: {m.activation}"
                                f"{', gated' if m.gated else ''})")
        return problems
    if not isinstance(c, Mamba2LMConfig):
        return ["Mamba-1 mixers (vLLM builds them without quantization: its MambaMixer takes no quantization "
                "config)"]
    problems = mamba2_problems(c)
    if c.norm != "rms" or not c.residual:
        problems.append(f"block norm {c.norm!r}{'' if c.residual else ' without residual connections'} (vLLM's "
                        "Mamba2ForCausalLM: RMSNorm blocks with residuals)")
    return problems


def mamba2_problems(c) -> list[str]:
    problems = []
    if c.d_ssm != c.d_inner:
        problems.append(f"an MLP part in in_proj (d_ssm {c.d_ssm} < d_inner {c.d_inner})")
    if getattr(c, "gated_norm", "after_gate") != "after_gate":
        problems.append(f"gated norm {c.gated_norm!r} (vLLM: norm(y * silu(z)))")
    return problems


def execution_problems(model: nn.Module, w_bits: int, skip: str | None = None) -> list[str]:
    """The parts of a quantized model (or block) that vLLM does not execute as we simulate them (empty: it does):
    online ops other than an input transform at out_proj / down_proj, activation quantizers other than its own,
    weights it cannot hold. Modules under `skip` are left out."""
    def problems_of(name: str, module: nn.Module) -> list[str]:
        if isinstance(module, Site) and module.op is not None:
            allowed = module.kind in TRANSFORM_SITES and isinstance(module.op, Rotate)
            return [] if allowed else [f"an online op at site {module.name} ({type(module.op).__name__})"]
        if getattr(module, "gate_scale", None) is not None:
            return [f"an S-SiLU gate in {name}"]
        return linear_problems(name, module, w_bits) if isinstance(module, QuantizedLinear) else []

    problems = module_problems(model, problems_of, skip)
    if isinstance(getattr(model, "embedding", None), QuantizedEmbedding):
        problems.append("a quantized embedding (vLLM's is float)")
    return problems


def linear_problems(name: str, linear: QuantizedLinear, w_bits: int) -> list[str]:
    problems = []
    if name.endswith("lm_head") or name == "lm_head":
        problems.append("a quantized LM head (left in float for vLLM)")
    if linear.bits not in (4, 8):
        problems.append(f"int{linear.bits} weights in {name} (vLLM: int8 or int4)")
    elif linear.bits == 4 and linear.out_features % W4_OUTPUT_MULTIPLE:
        problems.append(f"int4 weights in {name} with {linear.out_features} outputs (vLLM's 4-bit kernels: a "
                        f"multiple of {W4_OUTPUT_MULTIPLE})")
    quantizer = linear.input_quantizer
    if quantizer is not None:
        if linear.bits != 8 or linear.scale.dim() == 3:
            problems.append(f"quantized inputs to {name} with int{linear.bits} weights"
                            f"{' per group' if linear.scale.dim() == 3 else ''} (vLLM's W8A8: int8 per channel)")
        if not input_quantizer_ok(quantizer):
            problems.append(f"{quantizer.extra_repr()} at the input of {name} (vLLM: int8, static per tensor or "
                            "dynamic per token)")
    return problems


