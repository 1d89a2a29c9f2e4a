"""Uniform integer quantization: specs, scale computation, quantize-dequantize.

Conventions: symmetric quantization uses the restricted range [-(2^(b-1) - 1), 2^(b-1) - 1] with zero point 0;
asymmetric uses [0, 2^b - 1] with an integer zero point. Weights are quantized per output channel (optionally in
groups along the input); activations per tensor or per token, with static scales from calibration or dynamic
scales computed from each tensor at run time, or with static scales per channel of the last dimension, which
channels may share in clusters (Quamba2's groups), or dynamically per block of `group_size` consecutive values of a
token as llama.cpp quantizes a linear's input (its Q8_0 blocks: `block_fake_quantize`). With `half_scales` every
scale is rounded to float16, as an engine that stores its scales in float16 holds them.
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import InputError

WEIGHT_GRANULARITIES = ("channel", "group")
ACTIVATION_GRANULARITIES = ("tensor", "position", "token", "group", "channel", "block")
OBSERVERS = ("minmax", "percentile")


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    group_size: int = 128
    dynamic: bool = False
    observer: str = "minmax"
    percentile: float = 99.99
    clip: float = 1.0  # activations: the share of the observed (or, dynamic, the token's) range the scale covers
    half_scales: bool = False  # scales rounded to float16 (llama.cpp's blocks hold float16 scales)
    full_range: bool = False  # symmetric codes down to -2^(bits-1) (vLLM's static int8 inputs clamp to [-128, 127])

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise InputError(f"bit width {self.bits!r} is not supported; expected an integer from 2 to 8")
        if self.granularity not in WEIGHT_GRANULARITIES + ACTIVATION_GRANULARITIES:
            raise InputError(f"granularity {self.granularity!r}: expected one of "
                             f"{', '.join(WEIGHT_GRANULARITIES + ACTIVATION_GRANULARITIES)}")
        if self.observer not in OBSERVERS:
            raise InputError(f"observer {self.observer!r}: expected one of {', '.join(OBSERVERS)}")
        if not 50 < self.percentile <= 100:
            raise InputError(f"percentile {self.percentile} must be in (50, 100]")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not 0 < self.clip <= 1:
            raise InputError(f"clipping ratio {self.clip!r} must be in (0, 1]")

    @property
    def qmin(self) -> int:
        if self.symmetric:
            return -(2 ** (self.bits - 1)) if self.full_range else -(2 ** (self.bits - 1) - 1)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def scale_and_zero(low: torch.Tensor, high: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [low, high] (which are widened to include 0)."""
    low, high = torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))
    if spec.symmetric:
        scale = torch.maximum(-low, high) / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (high - low) / (spec.qmax - spec.qmin)
        zero = torch.round(spec.qmin - low / scale.clamp(min=1e-12))
    return scale.clamp(min=1e-12), zero


def half_scale(scale: torch.Tensor) -> torch.Tensor:
    """A positive float32 scale rounded to float16 (to nearest, as llama.cpp converts): at least the smallest
    float16 above 0, and refused above float16's largest value."""
    rounded = scale.half().float()
    if torch.isinf(rounded).any():
        raise InputError(f"a scale of {scale.max().item():g} does not fit a float16 scale (at most 65504); expected "
                         "smaller values for an engine with float16 scales")
    return rounded.clamp_(min=2.0**-24)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Real values -> integer codes (as float tensor), clamped to the spec's range."""
    return torch.clamp(torch.round(x / scale) + zero, spec.qmin, spec.qmax)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize: the value an integer kernel would see, in floating point."""
    if spec.symmetric:  # zero is 0: the same numbers in one allocation (this runs on every scan state h)
        return torch.div(x, scale).round_().clamp_(spec.qmin, spec.qmax).mul_(scale)
    return (quantize(x, scale, zero, spec) - zero) * scale


def weight_scale_and_zero(weight: torch.Tensor, spec: QuantSpec,
                          clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel (out, 1), or per group of `group_size` inputs (out, in / group_size, 1); `clip` (shaped
    like the scales) shrinks each range."""
    grouped = group_view(weight, spec)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    if clip is not None:
        low, high = low * clip, high * clip
    scale, zero = scale_and_zero(low, high, spec)
    return (half_scale(scale), zero) if spec.half_scales else (scale, zero)


def group_view(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.granularity == "channel":
        return weight
    if spec.granularity != "group":
        raise InputError(f"weights are quantized per 'channel' or per 'group', not per {spec.granularity!r}")
    if weight.shape[1] % spec.group_size:
        raise InputError(f"group size {spec.group_size} does not divide the input width {weight.shape[1]}")
    return weight.reshape(weight.shape[0], -1, spec.group_size)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec,
                    clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: int8 codes shaped like `weight` and the scales (out, 1) or (out, groups, 1), each range
    shrunk by `clip` where given. Weights are symmetric, so a code times its scale is the weight."""
    if not spec.symmetric:
        raise InputError("weights are quantized symmetrically (integer codes times a scale, no zero point)")
    scale, zero = weight_scale_and_zero(weight, spec, clip)
    return quantize(group_view(weight, spec), scale, zero, spec).reshape(weight.shape).to(torch.int8), scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) times per-channel (out, 1) or per-group (out, groups, 1) scales."""
    grouped = codes.float().reshape(codes.shape[0], scale.shape[1], -1) if scale.dim() == 3 else codes.float()
    return (grouped * scale).reshape(codes.shape)


def fake_quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return dequantize_weight(*quantize_weight(weight, spec))


def block_fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """llama.cpp's Q8_0 quantization of a linear's input, dequantized: each block of `group_size` values of a token
    gets d = amax / qmax (stored in float16 with `half_scales`) and the codes round(x * (qmax / amax)) (its
    vectorised path: the reciprocal multiplied, ties to even)."""
    blocks = x.unflatten(-1, (-1, spec.group_size))
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, spec.qmax / amax, torch.zeros_like(amax))
    scale = amax / spec.qmax
    if spec.half_scales:
        scale = scale.half().float()
    return (blocks * inverse).round_().mul_(scale).flatten(-2)


def group_fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Dynamic quantization with one range per group of `group_size` consecutive channels of each token (each head of
    a KV cache entry), shrunk by `spec.clip`, dequantized."""
    groups = x.unflatten(-1, (-1, spec.group_size))
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale, zero = scale_and_zero(low * spec.clip, high * spec.clip, spec)
    return fake_quantize(groups, scale, zero, spec).flatten(-2)


def token_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the channel dims of a (batch, time, channels...) site tensor, one pair per token."""
    dims = tuple(range(2, x.dim()))
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


class ActivationQuantizer(nn.Module):
    """A site op that fake-quantizes the tensor at the site. Static: one (low, high) range per tensor, or one per
    time position for fixed-length inputs (images), accumulated by `observe` during calibration; dynamic: the range
    of each tensor, of each token or of each group of a token's channels, computed at run time."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        if spec.granularity not in ACTIVATION_GRANULARITIES:
            raise InputError(f"activations are quantized per {', '.join(map(repr, ACTIVATION_GRANULARITIES))}, "
                             f"not per {spec.granularity!r}")
        if spec.granularity == "token" and not spec.dynamic:
            raise InputError("per-token activation scales are dynamic; pass dynamic=True")
        if spec.granularity == "position" and (spec.dynamic or spec.observer != "minmax"):
            raise InputError("per-position activation scales are static min-max ranges")
        if spec.granularity == "group" and not spec.dynamic:
            raise InputError("per-group activation scales are dynamic (one range per group of a token's channels)")
        if spec.granularity == "channel" and spec.dynamic:
            raise InputError("per-channel activation scales are static")
        if spec.granularity == "block" and not (spec.dynamic and spec.symmetric):
            raise InputError("per-block activation scales are dynamic and symmetric (llama.cpp's Q8_0 inputs)")
        self.spec = spec
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self.batches = 0
        self.static_cache = None  # (low, high, their versions, scale, zero): static ranges change only in calibration

    @torch.no_grad()
    def observe(self, site, x: torch.Tensor) -> None:
        """A site observer accumulating the static range: running min/max, or the mean over batches of the lower and upper
        percentiles (a robust range that ignores the rarest outliers)."""
        if self.spec.observer == "percentile":
            per_channel = self.spec.granularity == "channel"
            low, high = percentile_range(x.reshape(-1, x.shape[-1]).T if per_channel else x, self.spec.percentile,
                                         rows=per_channel)
            if self.batches:  # running mean over batches
                weight = self.batches / (self.batches + 1)
                low, high = weight * self.low + (1 - weight) * low, weight * self.high + (1 - weight) * high
        else:  # running min and max, over everything or over all but the time (per position) or last dimension
            dims = {"position": (0,) + tuple(range(2, x.dim())),
                    "channel": tuple(range(x.dim() - 1))}.get(self.spec.granularity, tuple(range(x.dim())))
            low, high = x.amin(dim=dims), x.amax(dim=dims)
            if self.batches:
                low, high = torch.minimum(self.low, low), torch.maximum(self.high, high)
        self.low, self.high = low.detach().float(), high.detach().float()
        self.batches += 1

    @property
    def per_token(self) -> bool:
        """Whether each token is quantized on its own (see `Site.per_token`): all but a dynamic range over the whole
        tensor and per-position ranges (those index the tensor's time dimension)."""
        return not (self.spec.dynamic and self.spec.granularity == "tensor") and self.spec.granularity != "position"

    def scale_and_zero(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point for `x`, broadcastable to it."""
        if self.spec.dynamic:
            low, high = token_range(x) if self.spec.granularity == "token" else (x.min(), x.max())
            if self.spec.clip != 1:
                low, high = low * self.spec.clip, high * self.spec.clip
            return scale_and_zero(low, high, self.spec)
        if self.batches == 0:
            raise RuntimeError("static activation quantizer used before calibration")
        scale, zero = self.static_scale_and_zero()
        if self.spec.granularity == "position":
            if x.shape[1] != scale.shape[0]:
                raise InputError(f"per-position ranges for {scale.shape[0]} positions, got {x.shape[1]}")
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return scale.view(shape), zero.view(shape)
        if self.spec.granularity == "channel" and x.shape[-1] != scale.shape[0]:
            raise InputError(f"per-channel ranges for {scale.shape[0]} channels, got {x.shape[-1]}")
        return scale, zero

    def static_scale_and_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The static range's scale and zero point, computed again only when the range tensors change (decoding
        calls each quantizer once per token and layer, where these few small ops would cost more than the rest)."""
        versions = (self.low._version, self.high._version)  # in-place writes (load_state_dict) bump them
        cached = self.static_cache
        if cached is None or cached[0] is not self.low or cached[1] is not self.high or cached[2] != versions:
            clip = self.spec.clip
            self.static_cache = (self.low, self.high, versions,
                                 *scale_and_zero(self.low * clip, self.high * clip, self.spec))
        return self.static_cache[3], self.static_cache[4]

    def respecified(self, **changes) -> "ActivationQuantizer":
        """A quantizer with the same calibrated ranges and the spec changed (its bits, its clipping ratio)."""
        other = ActivationQuantizer(replace(self.spec, **changes))
        other.low, other.high, other.batches = self.low, self.high, self.batches
        return other

    @torch.no_grad()
    def share_ranges(self, clusters: torch.Tensor) -> None:
        """Per-channel ranges -> one range per cluster (`clusters`: a cluster index per channel), each channel
        taking its cluster's: the scales a kernel holds once per cluster."""
        count = int(clusters.max()) + 1
        low = torch.zeros(count).scatter_reduce(0, clusters, self.low, "amin", include_self=False)
        high = torch.zeros(count).scatter_reduce(0, clusters, self.high, "amax", include_self=False)
        self.low, self.high = low[clusters], high[clusters]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.granularity == "block":
            return block_fake_quantize(x, self.spec)
        if self.spec.granularity == "group":
            return group_fake_quantize(x, self.spec)
        scale, zero = self.scale_and_zero(x)
        return fake_quantize(x, scale, zero, self.spec)

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., channels) -> int8 codes (rows, channels), rows = x.flatten(0, -2), and their scale: one for the
        tensor (a 0-d tensor), or one per row, shaped (rows, 1)."""
        if not self.spec.symmetric:
            raise InputError("the int8 backend needs symmetric activation quantization")
        if self.spec.granularity in ("group", "channel", "block"):
            raise InputError(f"an integer linear takes one input scale per row, not per {self.spec.granularity}")
        scale, _ = self.scale_and_zero(x)
        q = torch.div(x, scale).round_().clamp_(self.spec.qmin, self.spec.qmax).to(torch.int8)
        if scale.numel() == 1:
            return q.reshape(-1, x.shape[-1]), scale.reshape(())
        return q.reshape(-1, x.shape[-1]), scale.expand(*x.shape[:-1], 1).reshape(-1, 1)

    def extra_repr(self) -> str:
        s = self.spec
        kind = f"dynamic per {s.granularity}" if s.dynamic else f"static per {s.granularity} ({s.observer})"
        if s.granularity in ("group", "block"):
            kind += f" of {s.group_size} values"
        if s.half_scales:
            kind += ", float16 scales"
        if s.full_range:
            kind += f", codes {s.qmin} to {s.qmax}"
        if s.granularity == "channel" and self.low.dim() == 1:
            distinct = len(torch.stack([self.low, self.high], 1).unique(dim=0))
            kind += f", {distinct} distinct ranges over {len(self.low)} channels"
        clipped = f", clipped to {s.clip:.2f} of the range" if s.clip != 1 else ""
        return f"int{s.bits} {'symmetric' if s.symmetric else 'asymmetric'}, {kind}{clipped}"


def percentile_range(x: torch.Tensor, percentile: float, max_elements: int = 1 << 20,
                     rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The (100 - p)-th and p-th percentiles of x, linearly interpolated as `torch.quantile` does, from the tails
    alone (two top-k selections: ~20x faster than sorting, which matters at the scan's state h); with `rows`, of
    each row of a 2-D x. Tensors above `max_elements` are subsampled with a fixed stride (deterministic)."""
    flat = x.detach().float().reshape(len(x), -1) if rows else x.detach().flatten().float()
    if flat.numel() > max_elements:
        flat = flat[..., :: -(-flat.numel() // max_elements)]
    return upper_percentile(-flat, percentile).neg(), upper_percentile(flat, percentile)


def upper_percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """torch.quantile(values, percentile / 100, dim=-1) for percentile >= 50, from the largest values only."""
    n = values.shape[-1]
    position = percentile / 100 * (n - 1)  # in ascending order
    below = int(position)
    largest = values.topk(n - below, dim=-1).values  # descending: ascending index i sits at n - 1 - i
    low, high = largest[..., n - 1 - below], largest[..., max(n - 2 - below, 0)]
    return low + (position - below) * (high - low)
