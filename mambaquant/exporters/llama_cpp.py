"""What llama.cpp executes, as rules the walk follows for `target="llama.cpp"` and the GGUF exporter checks.

llama.cpp runs a Mamba-1 (or FalconMamba) or Mamba-2 language model with: weights in F32, or in Q8_0 / Q4_0 blocks
of 32 values along the input with one float16 scale each (our per-channel scales and groups of a multiple of 32
fit them exactly once the scales are float16); each input of a Q8_0 / Q4_0 matrix product quantized by llama.cpp
itself, dynamically, to int8 per block of 32 values (`block_fake_quantize`); every other tensor (the conv, the
scan, its state, the norms) in float32; and no transform at run time: no online rotation, no S-SiLU gate, no scale
at a site."""


from torch import nn

from ..quant.linear import QuantizedEmbedding, QuantizedLinear
from ..quant.quantizer import ActivationQuantizer, QuantSpec, half_scale
from ..runtime import HybridLMConfig, Mamba2LMConfig, MambaLM, MambaMixer, Site
from .rules import module_problems

ENGINE = "llama.cpp"
BLOCK = 32  # the values of one Q8_0 / Q4_0 block, and of one block of a quantized input
WEIGHT_TYPES = {8: "Q8_0", 4: "Q4_0"}


def input_spec() -> QuantSpec:
    """llama.cpp's quantization of a Q8_0 / Q4_0 product's input: int8, per 32 values, float16 scale."""
    return QuantSpec(8, granularity="block", group_size=BLOCK, dynamic=True, half_scales=True)


def input_quantizer() -> ActivationQuantizer:
    return ActivationQuantizer(input_spec())


def holds_blocks(linear: nn.Module) -> bool:
    """Whether a linear's weight can be a Q8_0 / Q4_0 matrix: its input width a multiple of 32 (else it stays F32,
    like dt_proj's at a dt_rank of 12 or 48)."""
    return linear.in_features % BLOCK == 0


def engine_slots(slots: list) -> list:
    """The (owner, attribute, input site) slots whose linear llama.cpp holds quantized."""
    return [slot for slot in slots if holds_blocks(getattr(slot[0], slot[1]))]


def architecture_problems(model: nn.Module) -> list[str]:
    """Why llama.cpp's mamba / mamba2 graph cannot compute this model's function (empty: it can)."""
    if not isinstance(model, MambaLM):
        return [f"a {type(model).__name__} (llama.cpp runs Mamba language models: mamba, mamba2)"]
    c = model.config
    if isinstance(c, HybridLMConfig):
        return [f"a hybrid of {', '.join(dict.fromkeys(c.blocks))} blocks (not exported yet)"]
    problems = []
    if isinstance(c, Mamba2LMConfig):
        if c.d_mlp:
            problems.append(f"an MLP part in in_proj (d_ssm {c.d_ssm} < d_inner {c.d_inner})")
        if c.dt_limit_min != 0 or c.dt_limit_max not in (0, float("inf")):
            problems.append(f"a time-step limit ({c.dt_limit_min}, {c.dt_limit_max})")
    else:
        if c.d_inner != 2 * c.d_model:
            problems.append(f"expand {c.expand} (llama.cpp's mamba needs d_inner = 2 d_model)")
        if c.x_proj_bias or c.dt_offset:
            problems.append("an x_proj bias or a dt offset")
    if c.bias:
        problems.append("biases on in_proj and out_proj")
    if c.norm != "rms" or not c.residual:
        problems.append(f"block norm {c.norm!r}{'' if c.residual else ' without residual connections'} (llama.cpp: "
                        "RMSNorm blocks with residuals)")
    return problems


def execution_problems(model: nn.Module, skip: str | None = None) -> list[str]:
    """The parts of a quantized model (or block) that llama.cpp does not execute as we simulate them (empty: it
    does): online transforms, activation quantizers other than its own, weight widths and scales it cannot hold.
    Modules under `skip` are left out."""
    problems = module_problems(model, module_problems_of, skip)
    if isinstance(getattr(model, "embedding", None), QuantizedEmbedding) and not model.config.tie_embeddings:
        problems.append("a quantized embedding not tied to the head")
    return problems


def module_problems_of(name: str, module: nn.Module) -> list[str]:
    if isinstance(module, Site) and module.op is not None:
        return [f"an online op at site {module.name} ({type(module.op).__name__})"]
    if isinstance(module, MambaMixer) and module.gate_scale is not None:
        return [f"an S-SiLU gate in {name}"]
    if isinstance(module, QuantizedLinear):
        return linear_problems(name, module)
    if isinstance(module, nn.Linear) and module.bias is not None and "dt_proj" not in name:
        return [f"a bias on {name}"]
    return []


def linear_problems(name: str, linear: QuantizedLinear) -> list[str]:
    problems = []
    if linear.bits not in WEIGHT_TYPES:
        problems.append(f"int{linear.bits} weights in {name} (llama.cpp blocks hold 8 or 4 bits)")
    group = linear.in_features // linear.scale.shape[1] if linear.scale.dim() == 3 else linear.in_features
    if linear.in_features % BLOCK or group % BLOCK:
        problems.append(f"weight blocks of {group} inputs in {name} (llama.cpp's are 32, or a multiple)")
    if not (half_scale(linear.scale) == linear.scale).all():
        problems.append(f"float32 weight scales in {name} (llama.cpp's are float16)")
    quantizer = linear.input_quantizer
    if quantizer is None:
        problems.append(f"an unquantized input to {name} (llama.cpp quantizes every Q8_0 / Q4_0 product's input)")
    elif quantizer.spec != input_spec():
        problems.append(f"{quantizer.extra_repr()} at the input of {name} (llama.cpp's: int8 per 32 values)")
    return problems
