"""The methods, as recipes over the runtime's sites, and `quantize`, the one verb from a full-precision model to a
quantized one.

`quantize` walks the model one block at a time, holding only that block's calibration inputs. For each block, in
this order: the method's function-preserving transforms, each from full-precision statistics of the block as
transformed so far; static activation ranges, the granularity choice and GPTQ Hessians, in full precision; the
block's full-precision outputs (the next block's inputs); then its weights are quantized. Activation quantizers
are switched on only at the very end. (The official MambaQuant code quantized weights on the first forward pass,
before some rotations, and gathered statistics with quantization already on.)
"""

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

from .errors import InputError
from .progress import progress as progress_of
from .quant.gptq import gptq_quantize
from .quant.linear import BACKENDS, QuantizedLinear
from .quant.quantizer import ActivationQuantizer, QuantSpec, quantize_weight
from .runtime import Mamba2Mixer, MambaLM, Site, VisionMamba
from .transforms.klt import AbsMaxObserver, CovarianceObserver, klt_hadamard
from .transforms.rotation import (
    Rotate,
    append_op,
    branches,
    fuse_norms,
    head_of,
    random_hadamard,
    rotate_dt_path,
    rotate_linear_input,
    rotate_residual,
    rotate_state,
    untie_head,
)
from .transforms.smoothing import (
    smooth_conv_input,
    smooth_dt_input,
    smooth_gate,
    smooth_norm_output,
    smooth_state,
    smoothing_scales,
    state_smoothing_scales,
)

METHODS = ("fp", "rtn", "smoothquant", "quarot", "gptq", "quamba", "mambaquant")
GRANULARITIES = ("tensor", "token", "auto")
PRESETS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a16": (4, 16)}
FULL_PRECISION = 16  # bits meaning "quantize nothing here"
# QuaRot's paper rounds its rotated weights with GPTQ, and so do we for MambaQuant: at W4 it is worth ~0.6 % bits per
# byte on mamba-shakespeare over round-to-nearest (RTN is still one option away: weight_rounding="rtn")
WEIGHT_ROUNDING = {"gptq": "gptq", "quarot": "gptq", "mambaquant": "gptq"}
# Static ranges from the 99.99th percentile instead of min-max: Quamba's SSM input and state; for MambaQuant the
# heavy-tailed state h (as the paper's official code does). On training data (never the evaluation split), W8A8
# static: typeseg agreement on its calibration files 97.23 % (min-max) -> 99.83 %, mamba-shakespeare training
# text 1.5890 -> 1.5823 bits per byte.
PERCENTILE_SITES = {"quamba": ("x_proj_in", "h"), "mambaquant": ("h",)}
CHUNKED_SITES = ("dA", "dBu", "h")  # the scan hands these over in time chunks: no per-position ranges there


@dataclass
class QuantConfig:
    method: str = "mambaquant"
    w_bits: int = 8
    a_bits: int = 8  # 16: weights only
    act_granularity: str | None = None  # None: "auto" for mambaquant, "tensor" for the baselines
    observer: str = "minmax"  # static ranges: "minmax" or "percentile"
    percentile: float = 99.99
    weight_group_size: int = 0  # 0: per output channel
    weight_rounding: str | None = None  # "rtn" or "gptq"; None: the method's own (WEIGHT_ROUNDING)
    alpha: float = 0.5  # smoothing strength
    token_outlier_ratio: float = 10.0  # auto: tokens whose |x| max exceeds this many times the median token's ...
    token_outlier_share: float = 0.01  # ... in more than this share of tokens: token-wise outliers
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.weight_rounding is None:
            self.weight_rounding = WEIGHT_ROUNDING.get(self.method, "rtn")
        if self.weight_rounding not in ("rtn", "gptq"):
            raise InputError(f"unknown weight rounding {self.weight_rounding!r}; expected rtn or gptq")
        if self.act_granularity is None:
            self.act_granularity = "auto" if self.method == "mambaquant" else "tensor"
        if self.act_granularity not in GRANULARITIES:
            raise InputError(f"unknown activation granularity {self.act_granularity!r}; "
                             f"expected one of {', '.join(GRANULARITIES)}")
        for bits in (self.w_bits, self.a_bits):
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise InputError(f"bit widths must be integers from 2 to 8, or 16 for none; got {bits!r}")
            if bits != FULL_PRECISION:
                QuantSpec(bits)  # raises for anything outside 2..8
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InputError(f"the seed must be an integer from 0 to {2**63 - 1}, got {self.seed!r}")

    @classmethod
    def preset(cls, bits: str, **kwargs) -> "QuantConfig":
        if bits.lower() not in PRESETS:
            raise InputError(f"unknown bit widths {bits!r}; expected one of {', '.join(PRESETS)}")
        w_bits, a_bits = PRESETS[bits.lower()]
        return cls(w_bits=w_bits, a_bits=a_bits, **kwargs)

    def weight_spec(self) -> QuantSpec:
        group = self.weight_group_size
        return QuantSpec(self.w_bits, granularity="group" if group else "channel", group_size=group or 128)


@dataclass
class QuantReport:
    config: dict
    transforms: list[str] = field(default_factory=list)
    activation_sites: dict[str, str] = field(default_factory=dict)  # site -> its quantizer
    granularity_reasons: dict[str, str] = field(default_factory=dict)
    weights: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """What was quantized where, grouped by site kind over the layers."""
        c = self.config
        lines = [f"method {c['method']}, weights int{c['w_bits']}, activations "
                 f"{'full precision' if c['a_bits'] == FULL_PRECISION else 'int' + str(c['a_bits'])}, "
                 f"granularity {c['act_granularity']}"]
        lines += [f"  transforms: {t}" for t in self.transforms]
        lines += [f"  weights: {w}" for w in self.weights]
        by_kind: dict[str, Counter] = {}
        for name, description in self.activation_sites.items():
            kind = ".".join(part for part in name.split(".") if not part.isdigit() and part != "layers")
            by_kind.setdefault(kind, Counter())[description] += 1
        for kind, counts in by_kind.items():
            lines.append(f"  {kind}: " + "; ".join(f"{d} x{n}" for d, n in counts.items()))
        return "\n".join(lines)


class Runner:
    """Runs one stage of the model (a block, or the output head) over the stored calibration inputs."""

    def __init__(self, stage: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor]):
        self.stage, self.inputs = stage, inputs

    @torch.no_grad()
    def observe(self, observers: dict[Site, Callable]) -> None:
        for site, observer in observers.items():
            site.observers.append(observer)
        try:
            for x in self.inputs:
                self.stage(x)
        finally:
            for site, observer in observers.items():
                site.observers.remove(observer)

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        return [self.stage(x) for x in self.inputs]


def block_linears(layer) -> list[tuple[nn.Module, str, Site]]:
    """The block's quantized linear layers as (owner, attribute, site carrying the input)."""
    mixer = layer.mixer
    slots = [(mixer, "in_proj", layer.sites["norm"])]
    for ssm in branches(mixer):
        slots += [(ssm, "x_proj", ssm.sites["x_proj_in"]), (ssm, "dt_proj", ssm.sites["dt_low"])]
    return slots + [(mixer, "out_proj", mixer.sites["out_proj_in"])]


def head_slot(model) -> tuple[nn.Module, str, Site]:
    return model, "lm_head" if isinstance(model, MambaLM) else "head", model.sites["norm_f"]


def linear_slots(model) -> list[tuple[nn.Module, str, Site]]:
    """Every quantized linear layer of the model with the site that carries its input."""
    return [slot for layer in model.layers for slot in block_linears(layer)] + [head_slot(model)]


def block_activation_sites(layer) -> list[Site]:
    """Where a block's activations are quantized: every linear input, the conv1d input, both operands of h*C."""
    sites = [site for _, _, site in block_linears(layer)] + [layer.mixer.sites["x"]]
    for ssm in branches(layer.mixer):
        sites += [ssm.sites["h"], ssm.sites["C"]]
    return sites


def activation_sites(model: nn.Module) -> list[Site]:
    return [site for layer in model.layers for site in block_activation_sites(layer)] + [model.sites["norm_f"]]


# ---------------------------------------------------------------------------------------------------------------
# The methods' transforms: model-wide ones before the walk, per-block ones during it, head ones after it
# ---------------------------------------------------------------------------------------------------------------


def conv_weight_columns(mixer) -> torch.Tensor:
    """The conv1d taps of every branch as rows (taps x branches, E): the "weight" a conv input smoothing balances."""
    return torch.cat([ssm.conv1d.weight[:, 0, :].T for ssm in branches(mixer)])


def smoothquant_block(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    mixer = layer.mixer
    absmax = {layer.sites["norm"]: AbsMaxObserver(), mixer.sites["x"]: AbsMaxObserver()}
    absmax.update({ssm.sites["dt_low"]: AbsMaxObserver() for ssm in branches(mixer)})
    runner.observe(absmax)
    smooth_norm_output(layer.norm, mixer.in_proj,
                       smoothing_scales(absmax[layer.sites["norm"]].absmax, mixer.in_proj.weight, config.alpha))
    smooth_conv_input(mixer, branches(mixer),
                      smoothing_scales(absmax[mixer.sites["x"]].absmax, conv_weight_columns(mixer), config.alpha))
    for ssm in branches(mixer):
        smooth_dt_input(ssm, smoothing_scales(absmax[ssm.sites["dt_low"]].absmax, ssm.dt_proj.weight, config.alpha))


def smoothquant_head(model, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    absmax = AbsMaxObserver()
    runner.observe({model.sites["norm_f"]: absmax})
    untie_head(model)  # the head's columns are about to be scaled, the embedding's must not be
    head = head_of(model)
    smooth_norm_output(model.norm_f, head, smoothing_scales(absmax.absmax, head.weight, config.alpha))
    report.transforms.append(f"SmoothQuant (alpha {config.alpha}) at in_proj, conv1d, dt_proj and head inputs")


def run_blocks(model, batch: torch.Tensor) -> torch.Tensor:
    """The model up to its last block: a pass that observes the blocks never computes the head's output (for an LM
    the largest tensor of the forward)."""
    hidden = model.embed(batch)
    for layer in model.layers:
        hidden = layer(hidden)
    return hidden


def quarot_model(model, batches, config: QuantConfig, report: QuantReport) -> None:
    fuse_norms(model)
    rotate_residual(model, random_hadamard(model.config.d_model, config.seed))
    report.transforms.append("norm fusion; randomised Hadamard on the residual stream (offline); per block: "
                             "randomised Hadamard on the dt path (offline), Hadamard on the state dimension (C "
                             "offline, h online), online Hadamard at out_proj and x_proj inputs")


def quarot_block(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    mixer = layer.mixer
    rotate_linear_input(mixer.sites["out_proj_in"], mixer.out_proj, Rotate(mixer.out_proj.in_features))
    for ssm in branches(mixer):
        rotate_linear_input(ssm.sites["x_proj_in"], ssm.x_proj, Rotate(ssm.x_proj.in_features))
        rotate_dt_path(ssm, random_hadamard(ssm.dt_rank, config.seed + 1))
        rotate_state(ssm, random_hadamard(ssm.d_state, config.seed + 2))


def quamba_model(model, batches, config: QuantConfig, report: QuantReport) -> None:
    report.transforms.append("per block: online Hadamard at out_proj input; percentile ranges at the SSM input "
                             "(x_proj_in) and state (h)")


def quamba_block(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    mixer = layer.mixer
    rotate_linear_input(mixer.sites["out_proj_in"], mixer.out_proj, Rotate(mixer.out_proj.in_features))


def mambaquant_model(model, batches, config: QuantConfig, report: QuantReport) -> None:
    """KLT-enhanced rotation of the residual stream: it is shared by every block, so it gets one rotation, from the
    covariance of all in_proj inputs pooled."""
    fuse_norms(model)
    residual = CovarianceObserver()
    Runner(partial(run_blocks, model), batches).observe({layer.sites["norm"]: residual for layer in model.layers})
    rotate_residual(model, klt_hadamard(residual.covariance()))
    report.transforms.append(
        "norm fusion; KLT-enhanced rotation of the residual stream (pooled covariance of the in_proj inputs); per "
        "block: smooth-fused rotation at out_proj (S-SiLU smoothing + online Hadamard), online Hadamard at x_proj "
        "input, conv1d and dt_proj input smoothing, KLT-enhanced rotation of the dt path (its own covariance), "
        "h*C smoothing per state channel and Hadamard on the state dimension"
    )


def mambaquant_block(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    mixer, ssms = layer.mixer, branches(layer.mixer)
    absmax = {mixer.sites["out_proj_in"]: AbsMaxObserver(), mixer.sites["x"]: AbsMaxObserver()}
    for ssm in ssms:
        absmax.update({ssm.sites[kind]: AbsMaxObserver() for kind in ("dt_low", "C", "h")})
    runner.observe(absmax)
    smooth_gate(mixer, smoothing_scales(absmax[mixer.sites["out_proj_in"]].absmax, mixer.out_proj.weight, config.alpha))
    rotate_linear_input(mixer.sites["out_proj_in"], mixer.out_proj, Rotate(mixer.out_proj.in_features))
    smooth_conv_input(mixer, ssms,
                      smoothing_scales(absmax[mixer.sites["x"]].absmax, conv_weight_columns(mixer), config.alpha))
    for ssm in ssms:
        rotate_linear_input(ssm.sites["x_proj_in"], ssm.x_proj, Rotate(ssm.x_proj.in_features))
        smooth_dt_input(ssm, smoothing_scales(absmax[ssm.sites["dt_low"]].absmax, ssm.dt_proj.weight, config.alpha))
        smooth_state(ssm, state_smoothing_scales(absmax[ssm.sites["h"]].absmax, absmax[ssm.sites["C"]].absmax,
                                                 config.alpha))
    covariances = {ssm.sites["dt_low"]: CovarianceObserver() for ssm in ssms}
    runner.observe(covariances)
    for ssm in ssms:
        rotate_dt_path(ssm, klt_hadamard(covariances[ssm.sites["dt_low"]].covariance()))  # one K per site and block
        rotate_state(ssm, random_hadamard(ssm.d_state, config.seed + 2))


def no_op(*args) -> None:
    return None


# method -> (model-wide transforms, per-block transforms, head transforms)
RECIPES = {
    "fp": (no_op, no_op, no_op),
    "rtn": (no_op, no_op, no_op),
    "gptq": (no_op, no_op, no_op),
    "smoothquant": (no_op, smoothquant_block, smoothquant_head),
    "quarot": (quarot_model, quarot_block, no_op),
    "quamba": (quamba_model, quamba_block, no_op),
    "mambaquant": (mambaquant_model, mambaquant_block, no_op),
}


# ---------------------------------------------------------------------------------------------------------------
# Activation quantizers: granularity per site, static ranges
# ---------------------------------------------------------------------------------------------------------------


class TokenStatistics:
    """Per-token |x| max at a site over the calibration set, kept per (sample, position)."""

    def __init__(self):
        self.token_max = []

    @torch.no_grad()
    def __call__(self, site, x: torch.Tensor) -> None:
        self.token_max.append(x.detach().abs().flatten(2).amax(-1).float())

    def decide(self, config: QuantConfig, fixed_length: bool) -> tuple[str, str]:
        """("tensor" | "position" | "token", reason)."""
        token_max = torch.cat([t.flatten() for t in self.token_max])
        median = token_max.median().clamp(min=1e-12)
        share = (token_max > config.token_outlier_ratio * median).float().mean().item()
        found = (f"{100 * share:.2f} % of tokens above {config.token_outlier_ratio:g}x the median token max "
                 f"(largest {(token_max.max() / median).item():.1f}x)")
        if share <= config.token_outlier_share:
            return "tensor", f"static per tensor: {found}"
        if fixed_length:
            per_position = torch.cat(self.token_max)  # (samples, positions)
            looseness = (per_position.amax(0, keepdim=True) / per_position.clamp(min=1e-12)).quantile(0.9).item()
            if looseness <= 4.0:
                return "position", (f"static per position: {found}, at stable positions (a position's range is within "
                                    f"{looseness:.1f}x of its tokens' max for 90 % of tokens)")
            found += f"; not tied to positions ({looseness:.1f}x)"
        return "token", f"dynamic per token: {found}"


def make_quantizer(granularity: str, config: QuantConfig, percentile: bool) -> ActivationQuantizer:
    observer = "percentile" if percentile else config.observer
    spec = QuantSpec(config.a_bits, granularity=granularity, dynamic=granularity == "token",
                     observer="minmax" if granularity == "position" else observer, percentile=config.percentile)
    return ActivationQuantizer(spec)


def calibrate_quantizers(sites: list[Site], runner: Runner, config: QuantConfig, fixed_length: bool,
                         report: QuantReport) -> list[tuple[Site, ActivationQuantizer]]:
    """A quantizer per site with its granularity and static range, from full-precision statistics; none is
    switched on yet."""
    if config.act_granularity == "auto":
        statistics = {site: TokenStatistics() for site in sites}
        runner.observe(statistics)
    quantizers = []
    for site in sites:
        if config.act_granularity == "auto":
            granularity, reason = statistics[site].decide(config, fixed_length and site.kind not in CHUNKED_SITES)
            report.granularity_reasons[site.name] = reason
        else:
            granularity = config.act_granularity
        percentile = site.kind in PERCENTILE_SITES.get(config.method, ())
        quantizers.append((site, make_quantizer(granularity, config, percentile)))
    static = {site: quantizer.observe for site, quantizer in quantizers if not quantizer.spec.dynamic}
    if static:
        runner.observe(static)
    return quantizers


@torch.no_grad()
def quantize_linears(slots: list[tuple[nn.Module, str, Site]], runner: Runner, config: QuantConfig) -> None:
    """Replace each linear layer by a `QuantizedLinear` (integer codes and scales), rounded to nearest or by GPTQ.
    A tied LM head shares its matrix with the embedding, which then reads the dequantized codes too."""
    spec = config.weight_spec()
    if config.weight_rounding == "gptq":
        moments = {}
        for _, _, site in slots:
            moments.setdefault(site, CovarianceObserver())
        runner.observe(moments)
    for owner, name, site in slots:
        linear = getattr(owner, name)
        if config.weight_rounding == "gptq":
            codes, scale = gptq_quantize(linear.weight, moments[site].outer / moments[site].count, spec)
        else:
            codes, scale = quantize_weight(linear.weight, spec)
        quantized = QuantizedLinear(codes, scale, linear.bias, spec.bits)
        if isinstance(owner, MambaLM) and owner.config.tie_embeddings:
            owner.embedding.weight = nn.Parameter(quantized.dequantized_weight(), requires_grad=False)
        setattr(owner, name, quantized)


# ---------------------------------------------------------------------------------------------------------------
# The verb
# ---------------------------------------------------------------------------------------------------------------


def run_recipe(model: nn.Module, config: QuantConfig, batches: list[torch.Tensor],
               progress: bool = False) -> tuple[nn.Module, QuantReport]:
    """A quantized copy of `model` and the report of what was done where."""
    if not batches:
        raise InputError("the calibration set is empty; expected at least one batch of training data")
    torch.manual_seed(config.seed)
    model = copy.deepcopy(model).eval()
    report = QuantReport(config=asdict(config))
    if config.method == "fp":
        return model, report
    check_mamba1_blocks(model, f"method {config.method}: quantizing")
    model_transform, block_transform, head_transform = RECIPES[config.method]
    model_transform(model, batches, config, report)
    quantize_acts, quantize_weights = config.a_bits != FULL_PRECISION, config.w_bits != FULL_PRECISION
    fixed_length = isinstance(model, VisionMamba)
    pending = []
    with torch.no_grad():
        hidden = check_finite_activations([model.embed(batch) for batch in batches], "the embedding's output")
    bar = progress_of(model.layers, f"{config.method} w{config.w_bits}a{config.a_bits}", "block", progress)
    for index, layer in enumerate(bar):
        runner = Runner(layer, hidden)
        block_transform(layer, runner, config, report)
        if quantize_acts:
            pending += calibrate_quantizers(block_activation_sites(layer), runner, config, fixed_length, report)
        # the next block's inputs, from this block in full precision
        outputs = check_finite_activations(runner.outputs(), f"the output of block {index}")
        if quantize_weights:
            quantize_linears(block_linears(layer), runner, config)
        hidden = outputs
    head_runner = Runner(model.output, hidden)
    head_transform(model, head_runner, config, report)
    if quantize_acts:
        pending += calibrate_quantizers([model.sites["norm_f"]], head_runner, config, fixed_length, report)
    if quantize_weights:
        quantize_linears([head_slot(model)], head_runner, config)
        spec = config.weight_spec()
        report.weights.append(f"{'GPTQ' if config.weight_rounding == 'gptq' else 'round-to-nearest'} int{spec.bits} per "
                              f"{spec.granularity}: in_proj, x_proj, dt_proj, out_proj of every block, and the head")
    consumers = {site: getattr(owner, name) for owner, name, site in linear_slots(model)}
    for site, quantizer in pending:
        if isinstance(consumers.get(site), QuantizedLinear):
            consumers[site].input_quantizer = quantizer  # an integer linear quantizes its own input
        else:
            append_op(site, quantizer)
        report.activation_sites[site.name] = quantizer.extra_repr()
    check_finite(model)
    return model, report


def check_mamba1_blocks(model: nn.Module, doing: str) -> None:
    """The methods' transforms and the analysis of them act on Mamba-1 blocks only (so far)."""
    if any(isinstance(module, Mamba2Mixer) for module in model.modules()):
        raise InputError(f"{doing} Mamba-2 blocks is not supported yet; Mamba-2 models run, evaluate, generate and "
                         "save in full precision")


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Run the quantized linear layers as a float32 simulation of their integer arithmetic ("fake") or as int8 x
    int8 -> int32 products ("int8"). The other quantization points (conv1d input, h, C) are simulated in both."""
    linears = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    check_backend(backend, bool(linears))
    for linear in linears:
        linear.set_backend(backend)
    return model


def check_backend(backend: str, quantized_weights: bool) -> None:
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "int8" and not quantized_weights:
        raise InputError("the int8 backend needs a model with quantized weights (w_bits <= 8)")


def check_finite_activations(tensors: list[torch.Tensor], where: str) -> list[torch.Tensor]:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise InputError(f"calibration produced NaN or Inf at {where}; expected finite activations: check the "
                         "model's weights and the calibration data")
    return tensors


def check_finite(model: nn.Module) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"quantization produced NaN or Inf in {name}; check the calibration data")


def quantize(model, method: str = "mambaquant", w_bits: int = 8, a_bits: int = 8, calib=None,
             act_granularity: str | None = None, seed: int = 0, calib_samples: int = 32, calib_len: int | None = None,
             progress: bool = False, tokenizer: str | None = None, backend: str = "fake", **options) -> nn.Module:
    """Quantize `model` (a model object, an embedded model name, a directory or a checkpoint) with `method`.

    `calib`: a tensor of inputs (token ids (N, L) or images (N, C, H, W)), the name of a calibration set
    (see `mambaquant.calibration.CALIBRATION_SETS`), the path of a training text file, or None for the model's
    default set (embedded models and models whose task is known). `tokenizer`: the tokenizer.json for text
    calibration of a BPE-vocabulary model (default: GPT-NeoX's from the data directory). `backend`: "fake" runs the
    quantized linears as a float32 simulation of their integer arithmetic, "int8" with int8 matrix products (see
    `set_backend`; both give the same numbers). Bits of 16 quantize nothing there: `w_bits=16, a_bits=16` applies the method's
    transforms alone, which must keep the model's function. The returned model carries
    `quantization_report` (a `QuantReport`)."""
    from .calibration import resolve_calibration
    from .loaders import load

    source = model if isinstance(model, str) else type(model).__name__
    config = QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, act_granularity=act_granularity, seed=seed,
                         **options)
    check_backend(backend, config.w_bits != FULL_PRECISION)  # before any work
    model = load(model)
    batches = resolve_calibration(model, source, calib, calib_samples, calib_len, seed, tokenizer=tokenizer)
    quantized, report = run_recipe(model, config, batches, progress)
    quantized.quantization_report = report
    return set_backend(quantized, backend)
