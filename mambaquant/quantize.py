"""`quantize(model, config, calibration)`: one verb from a full-precision model to a quantized one.

The order is fixed, and is where the official MambaQuant code went wrong: (1) the method's function-preserving
transforms, each from full-precision statistics of the already-transformed model; (2) static activation ranges
and GPTQ Hessians, again in full precision; (3) only then activation quantizers are switched on and weights are
quantized, after every transform has touched them.
"""

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import InputError
from .quant.gptq import gptq_quantize
from .quant.quantizer import ActivationQuantizer, QuantSpec, fake_quantize_weight
from .runtime import Site, find_sites
from .transforms.klt import AbsMaxObserver, CovarianceObserver, klt_hadamard
from .transforms.rotation import (Rotate, append_op, branches, fuse_norms, head_of, random_hadamard, rotate_dt_path,
                                  rotate_linear_input, rotate_residual, rotate_state)
from .transforms.smoothing import (smooth_conv_input, smooth_dt_input, smooth_gate, smooth_norm_output, smooth_state,
                                   smoothing_scales)

METHODS = ("fp", "rtn", "smoothquant", "quarot", "gptq", "quamba", "mambaquant")
GRANULARITIES = ("static", "token", "auto")
PRESETS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a16": (4, None), "w6a6": (6, 6), "w4a4": (4, 4)}


@dataclass
class QuantConfig:
    method: str = "mambaquant"
    weight_bits: int = 8
    act_bits: int | None = 8  # None: weight-only
    granularity: str = "static"  # activations: "static" per tensor, dynamic per "token", or "auto" per site
    observer: str = "minmax"  # static ranges: "minmax" or "percentile"
    percentile: float = 99.99
    weight_group_size: int = 0  # 0: per output channel
    alpha: float = 0.5  # smoothing strength
    token_outlier_ratio: float = 10.0  # auto: a token whose |x| max is this many times the median token's ...
    token_outlier_share: float = 0.01  # ... in more than this share of tokens makes a site per-token
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"unknown granularity {self.granularity!r}; expected one of {', '.join(GRANULARITIES)}")
        QuantSpec(self.weight_bits)  # validates the bit widths
        if self.act_bits is not None:
            QuantSpec(self.act_bits)

    @classmethod
    def preset(cls, bits: str, **kwargs) -> "QuantConfig":
        if bits.lower() not in PRESETS:
            raise InputError(f"unknown bit widths {bits!r}; expected one of {', '.join(PRESETS)}")
        weight_bits, act_bits = PRESETS[bits.lower()]
        return cls(weight_bits=weight_bits, act_bits=act_bits, **kwargs)

    def weight_spec(self) -> QuantSpec:
        group = self.weight_group_size
        return QuantSpec(self.weight_bits, granularity="group" if group else "channel", group_size=group or 128)


@dataclass
class QuantReport:
    config: dict
    transforms: list[str] = field(default_factory=list)
    activation_sites: dict[str, str] = field(default_factory=dict)  # site -> quantizer description
    granularity_reasons: dict[str, str] = field(default_factory=dict)
    weights: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def linear_inputs(model: nn.Module) -> list[tuple[nn.Linear, Site]]:
    """Every quantized linear layer with the site that carries its input."""
    pairs = []
    for layer in model.layers:
        mixer = layer.mixer
        pairs.append((mixer.in_proj, layer.sites["norm"]))
        for ssm in branches(mixer):
            pairs += [(ssm.x_proj, ssm.sites["x_proj_in"]), (ssm.dt_proj, ssm.sites["dt_low"])]
        pairs.append((mixer.out_proj, mixer.sites["out_proj_in"]))
    pairs.append((head_of(model), model.sites["norm_f"]))
    return pairs


def activation_sites(model: nn.Module) -> list[Site]:
    """Where activations are quantized: every linear input, the conv1d input and both operands of h*C."""
    sites = [site for _, site in linear_inputs(model)]
    for layer in model.layers:
        sites.append(layer.mixer.sites["x"])
        for ssm in branches(layer.mixer):
            sites += [ssm.sites["h"], ssm.sites["C"]]
    return sites


@torch.no_grad()
def observe(model: nn.Module, batches: Iterable[torch.Tensor], observers: dict[str, object]) -> None:
    """One full-precision pass over the calibration batches with observers attached at the named sites."""
    sites = find_sites(model)
    for name, observer in observers.items():
        sites[name].observers.append(observer)
    try:
        for batch in batches:
            model(batch)
    finally:
        for name, observer in observers.items():
            sites[name].observers.remove(observer)


# ---------------------------------------------------------------------------------------------------------------
# The methods' transforms (function-preserving, full precision)
# ---------------------------------------------------------------------------------------------------------------


def transform_smoothquant(model, batches, config: QuantConfig, report: QuantReport) -> None:
    """SmoothQuant where a norm or a linear layer can absorb the scales: in_proj, head, conv1d and dt_proj inputs."""
    observers = {}
    for layer in model.layers:
        observers[layer.sites["norm"].name] = AbsMaxObserver()
        observers[layer.mixer.sites["x"].name] = AbsMaxObserver()
        for ssm in branches(layer.mixer):
            observers[ssm.sites["dt_low"].name] = AbsMaxObserver()
    observers["norm_f"] = AbsMaxObserver()
    observe(model, batches, observers)
    for layer in model.layers:
        mixer = layer.mixer
        s = smoothing_scales(observers[layer.sites["norm"].name].absmax, mixer.in_proj.weight, config.alpha)
        smooth_norm_output(layer.norm, mixer.in_proj, s)
        conv_weight = torch.cat([ssm.conv1d.weight[:, 0, :].T for ssm in branches(mixer)])
        smooth_conv_input(mixer, branches(mixer),
                          smoothing_scales(observers[mixer.sites["x"].name].absmax, conv_weight, config.alpha))
        for ssm in branches(mixer):
            smooth_dt_input(ssm, smoothing_scales(observers[ssm.sites["dt_low"].name].absmax, ssm.dt_proj.weight,
                                                  config.alpha))
    head = head_of(model)
    smooth_norm_output(model.norm_f, head, smoothing_scales(observers["norm_f"].absmax, head.weight, config.alpha))
    report.transforms.append(f"SmoothQuant (alpha {config.alpha}) at in_proj, conv1d, dt_proj and head inputs")


def transform_quarot(model, batches, config: QuantConfig, report: QuantReport) -> None:
    """Randomised Hadamard rotations everywhere a rotation fits: residual stream, dt path, state (offline);
    out_proj and x_proj inputs (online)."""
    fuse_norms(model)
    rotate_residual(model, random_hadamard(model.config.d_model, config.seed))
    for i, layer in enumerate(model.layers):
        mixer = layer.mixer
        rotate_linear_input(mixer.sites["out_proj_in"], mixer.out_proj, Rotate(mixer.out_proj.in_features))
        for ssm in branches(mixer):
            rotate_linear_input(ssm.sites["x_proj_in"], ssm.x_proj, Rotate(ssm.x_proj.in_features))
            rotate_dt_path(ssm, random_hadamard(ssm.dt_rank, config.seed + 1 + i))
            rotate_state(ssm, random_hadamard(ssm.d_state, config.seed))
    report.transforms.append("norm fusion; randomised Hadamard on the residual stream and dt path (offline); "
                             "Hadamard on the state dimension (C offline, h online); online Hadamard at out_proj "
                             "and x_proj inputs")


def transform_quamba(model, batches, config: QuantConfig, report: QuantReport) -> None:
    """Quamba: Hadamard at out_proj's input (online); the SSM input gets a percentile range (set in `calibrate`)."""
    for layer in model.layers:
        mixer = layer.mixer
        rotate_linear_input(mixer.sites["out_proj_in"], mixer.out_proj, Rotate(mixer.out_proj.in_features))
    report.transforms.append("online Hadamard at out_proj input; percentile clipping at the SSM input (x_proj_in, h)")


def transform_mambaquant(model, batches, config: QuantConfig, report: QuantReport) -> None:
    """MambaQuant: KLT-enhanced rotation of the residual stream and the dt path; smooth-fused rotation at out_proj
    (S-SiLU smoothing, then online Hadamard); online Hadamard at x_proj input; h*C smoothing and state rotation;
    conv input smoothing. Statistics come from the model as transformed so far, one K per site and layer."""
    fuse_norms(model)
    residual = CovarianceObserver()  # the residual stream is shared by all layers: one rotation, pooled statistics
    observe(model, batches, {layer.sites["norm"].name: residual for layer in model.layers})
    rotate_residual(model, klt_hadamard(residual.covariance()))

    absmax = {}
    for layer in model.layers:
        absmax[layer.mixer.sites["out_proj_in"].name] = AbsMaxObserver()
        absmax[layer.mixer.sites["x"].name] = AbsMaxObserver()
        for ssm in branches(layer.mixer):
            absmax[ssm.sites["dt_low"].name] = AbsMaxObserver()
            absmax[ssm.sites["C"].name] = AbsMaxObserver()
            absmax[ssm.sites["h"].name] = StateAbsMax()
    observe(model, batches, absmax)
    for layer in model.layers:
        mixer = layer.mixer
        s = smoothing_scales(absmax[mixer.sites["out_proj_in"].name].absmax, mixer.out_proj.weight, config.alpha)
        smooth_gate(mixer, s)
        rotate_linear_input(mixer.sites["out_proj_in"], mixer.out_proj, Rotate(mixer.out_proj.in_features))
        conv_weight = torch.cat([ssm.conv1d.weight[:, 0, :].T for ssm in branches(mixer)])
        smooth_conv_input(mixer, branches(mixer),
                          smoothing_scales(absmax[mixer.sites["x"].name].absmax, conv_weight, config.alpha))
        for ssm in branches(mixer):
            rotate_linear_input(ssm.sites["x_proj_in"], ssm.x_proj, Rotate(ssm.x_proj.in_features))
            smooth_dt_input(ssm, smoothing_scales(absmax[ssm.sites["dt_low"].name].absmax, ssm.dt_proj.weight,
                                                  config.alpha))
            # h*C: balance per state channel n between h (max over channels) and C
            h_max, c_max = absmax[ssm.sites["h"].name].absmax, absmax[ssm.sites["C"].name].absmax
            smooth_state(ssm, (h_max.clamp(min=1e-5) / c_max.clamp(min=1e-5)) ** config.alpha)

    covariances = {ssm.sites["dt_low"].name: CovarianceObserver() for layer in model.layers for ssm in branches(layer.mixer)}
    observe(model, batches, covariances)
    for layer in model.layers:
        for ssm in branches(layer.mixer):
            rotate_dt_path(ssm, klt_hadamard(covariances[ssm.sites["dt_low"].name].covariance()))
            rotate_state(ssm, random_hadamard(ssm.d_state, config.seed))
    report.transforms.append(
        "norm fusion; KLT-enhanced rotation of the residual stream (pooled covariance of the in_proj inputs) and of "
        "each dt path (its own covariance); smooth-fused rotation at out_proj (S-SiLU smoothing + online Hadamard); "
        "online Hadamard at x_proj input; conv1d input smoothing; dt_proj input smoothing; h*C smoothing and "
        "Hadamard on the state dimension"
    )


class StateAbsMax:
    """Largest |h| per state channel n (max over batch, time and d_inner)."""

    def __init__(self):
        self.absmax = None

    @torch.no_grad()
    def __call__(self, site, x: torch.Tensor) -> None:
        value = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        self.absmax = value if self.absmax is None else torch.maximum(self.absmax, value)


TRANSFORMS = {
    "smoothquant": transform_smoothquant,
    "quarot": transform_quarot,
    "quamba": transform_quamba,
    "mambaquant": transform_mambaquant,
}


# ---------------------------------------------------------------------------------------------------------------
# Activation ranges, granularity, weights
# ---------------------------------------------------------------------------------------------------------------


class TokenOutliers:
    """Share of tokens whose |x| max exceeds `ratio` x the median token's (over the calibration set)."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.token_max = []

    @torch.no_grad()
    def __call__(self, site, x: torch.Tensor) -> None:
        self.token_max.append(x.detach().abs().flatten(2).amax(-1).flatten())

    def share(self) -> tuple[float, float]:
        token_max = torch.cat(self.token_max)
        median = token_max.median().clamp(min=1e-12)
        return (token_max > self.ratio * median).float().mean().item(), (token_max.max() / median).item()


def choose_granularity(model, batches, sites: list[Site], config: QuantConfig, report: QuantReport) -> dict[str, bool]:
    """site name -> dynamic per-token? `auto` picks per token where calibration shows token-wise outliers."""
    if config.granularity != "auto":
        return {site.name: config.granularity == "token" for site in sites}
    detectors = {site.name: TokenOutliers(config.token_outlier_ratio) for site in sites}
    observe(model, batches, detectors)
    choice = {}
    for name, detector in detectors.items():
        share, worst = detector.share()
        choice[name] = share > config.token_outlier_share
        report.granularity_reasons[name] = (
            f"{'per-token' if choice[name] else 'per-tensor'}: {100 * share:.2f} % of tokens above "
            f"{config.token_outlier_ratio:g}x the median token max (largest {worst:.1f}x)"
        )
    return choice


def quamba_percentile_sites(model) -> set[str]:
    return {ssm.sites[kind].name for layer in model.layers for ssm in branches(layer.mixer) for kind in ("x_proj_in", "h")}


@torch.no_grad()
def calibrate_activation_quantizers(model, batches, config: QuantConfig,
                                    report: QuantReport) -> list[tuple[Site, ActivationQuantizer]]:
    """A quantizer per activation site, the static ones calibrated in full precision; none is switched on yet."""
    sites = activation_sites(model)
    per_token = choose_granularity(model, batches, sites, config, report)
    percentile_sites = quamba_percentile_sites(model) if config.method == "quamba" else set()
    quantizers = {}
    for site in sites:
        observer = "percentile" if site.name in percentile_sites else config.observer
        spec = QuantSpec(config.act_bits, granularity="token" if per_token[site.name] else "tensor",
                         dynamic=per_token[site.name], observer=observer, percentile=config.percentile)
        quantizers[site.name] = ActivationQuantizer(spec)
    static = {name: q.observe for name, q in quantizers.items() if not q.spec.dynamic}
    if static:
        observe(model, batches, static)
    return [(site, quantizers[site.name]) for site in sites]


@torch.no_grad()
def quantize_weights(model, batches, config: QuantConfig, report: QuantReport) -> None:
    spec = config.weight_spec()
    pairs = linear_inputs(model)
    if config.method == "gptq":
        moments = {}
        for linear, site in pairs:
            moments.setdefault(site.name, CovarianceObserver())
        observe(model, batches, moments)
        for linear, site in pairs:
            moment = moments[site.name]
            linear.weight.copy_(gptq_quantize(linear.weight, moment.outer / moment.count, spec))
        report.weights.append(f"GPTQ int{spec.bits} per {spec.granularity}, {len(pairs)} linear layers")
    else:
        for linear, _ in pairs:
            linear.weight.copy_(fake_quantize_weight(linear.weight, spec))
        report.weights.append(f"round-to-nearest int{spec.bits} per {spec.granularity}, {len(pairs)} linear layers")


def quantize(model: nn.Module, config: QuantConfig, batches: list[torch.Tensor]) -> tuple[nn.Module, QuantReport]:
    """A quantized copy of `model` (fake-quantized weights, activation quantizers at the sites) and a report of
    what was done where. `batches`: calibration inputs from training data, never from the evaluation split."""
    if not batches:
        raise InputError("the calibration set is empty; expected at least one batch of training data")
    torch.manual_seed(config.seed)
    model = copy.deepcopy(model).eval()
    report = QuantReport(config=asdict(config))
    if config.method == "fp":
        return model, report
    if config.method in TRANSFORMS:
        TRANSFORMS[config.method](model, batches, config, report)
    quantizers = []
    if config.act_bits is not None:
        quantizers = calibrate_activation_quantizers(model, batches, config, report)
    quantize_weights(model, batches, config, report)
    for site, quantizer in quantizers:
        append_op(site, quantizer)
        report.activation_sites[site.name] = quantizer.extra_repr()
    check_finite(model)
    return model, report


def check_finite(model: nn.Module) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"quantization produced NaN or Inf in {name}; check the calibration data")
