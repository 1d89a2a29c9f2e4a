"""The activation granularity of each site: static per tensor, static per position or dynamic per token. For
"auto", `TokenStatistics.decide` chooses per site from its full-precision token maxima and says why.
`StaticCheck` finds the sites where one static range cannot hold the signal and, where the config allows, what
does instead."""

import dataclasses

import torch

from ..quant.clipping import SiteSample
from ..quant.quantizer import ActivationQuantizer, QuantSpec
from .config import QuantConfig

CHUNKED_SITES = ("dA", "dBu", "h")  # the scan hands these over in time chunks: no per-position ranges there


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


def make_quantizer(granularity: str, config: QuantConfig, percentile: bool, bits: int) -> ActivationQuantizer:
    observer = "percentile" if percentile else config.observer
    spec = QuantSpec(bits, granularity=granularity, dynamic=granularity == "token",
                     observer="minmax" if granularity == "position" else observer, percentile=config.percentile,
                     full_range=config.target == "vllm" and granularity == "tensor")  # vLLM clamps to [-128, 127]
    return ActivationQuantizer(spec)


# A static range "holds" a site when the median calibration token keeps at least half its signal: its relative
# quantization error |Q(x) - x| / |x| at most this. A range set by rare large tokens rounds the typical token to zero
# (error 1): one slowly decaying state accumulating over a long sequence, or a few samples far larger than the rest,
# collapse a model that per-token ranges keep intact (issue 34's time-series classifier: 98 % -> 20 % top-1).
STATIC_ERROR_LIMIT = 0.5
# Where it does not, a static fallback is taken only within this factor of dynamic per-token ranges' error at the
# same width (a per-position range that "holds" at 0.27 where per-token ranges give 0.01 still costs 2.6 points of
# top-1 on the generality suite's vision model)
FALLBACK_SLACK = 2.0
FALLBACK_BITS = 8


@torch.no_grad()
def token_error(quantizer: ActivationQuantizer, sample: SiteSample) -> float:
    """The median over the sampled tokens of |Q(x) - x| / |x| (tokens that are all zero left out)."""
    errors = []
    for x in sample.samples:
        norms = x.flatten(2).norm(dim=-1)
        error = (quantizer(x) - x).flatten(2).norm(dim=-1)
        errors.append(error[norms > 0] / norms[norms > 0])
    errors = torch.cat(errors)
    return errors.median().item() if errors.numel() else 0.0


class StaticCheck:
    """Whether a site's static range holds its calibration tokens (`STATIC_ERROR_LIMIT`) and, where it does not and
    the config falls back (`QuantConfig.static_fallback`), what does instead: the first static range that comes
    within `FALLBACK_SLACK` of dynamic per-token ranges at the same width (per position, for a fixed-length model
    whose ranges grow or shrink along the sequence; then at `FALLBACK_BITS` bits, per tensor and per position),
    else dynamic per token (the static request not met there), at `FALLBACK_BITS` bits if the width cannot hold
    even that; nothing holding, the one with the least error. Every quantized site is an operand of an integer
    product (a norm's input never is), so there is no quantizer to drop instead."""

    def __init__(self, config: QuantConfig, per_position: bool, shared: SiteSample | None = None):
        """`shared`: the clipping search's sample of the site, taken instead of one of its own where it keeps the
        same tokens (per position or not)."""
        self.fallback, self.per_position = config.static_fallback, per_position
        self.owned = shared is None or shared.per_position != per_position
        self.sample = SiteSample(per_position) if self.owned else shared
        self.position = None  # a per-position candidate, observed beside the site's own range

    def observers(self, quantizer: ActivationQuantizer) -> list:
        observers = [self.sample] if self.owned else []
        if self.fallback and self.per_position and quantizer.spec.granularity == "tensor":
            self.position = ActivationQuantizer(dataclasses.replace(quantizer.spec, granularity="position",
                                                                    observer="minmax", clip=1.0))
            observers.append(self.position.observe)
        return observers

    def check(self, quantizer: ActivationQuantizer) -> tuple[ActivationQuantizer, str | None]:
        """(the quantizer to use, the report's line on the site, or None where the static range holds)."""
        error = token_error(quantizer, self.sample)
        if error <= STATIC_ERROR_LIMIT:
            return quantizer, None
        found = (f"{describe(quantizer)} does not hold: the median calibration token keeps "
                 f"{100 * max(0.0, 1 - error):.0f} % of its signal (relative error {error:.2f}, limit "
                 f"{STATIC_ERROR_LIMIT:g})")
        token = ActivationQuantizer(dataclasses.replace(quantizer.spec, granularity="token", dynamic=True,
                                                        observer="minmax", clip=1.0))
        dynamic_error = token_error(token, self.sample)
        if not self.fallback:
            return quantizer, f"{found}; dynamic per token would give {dynamic_error:.2f}"
        statics = [self.position] if self.position is not None else []
        if quantizer.spec.bits < FALLBACK_BITS:
            statics = statics + [q.respecified(bits=FALLBACK_BITS) for q in [quantizer] + statics]
        tried = []
        for candidate in statics:
            candidate_error = token_error(candidate, self.sample)
            if candidate_error <= min(STATIC_ERROR_LIMIT, FALLBACK_SLACK * dynamic_error):
                return candidate, (f"{found}; {describe(candidate)} instead: error {candidate_error:.2f} (dynamic "
                                   f"per token: {dynamic_error:.2f})")
            tried.append((candidate_error, candidate))
        not_met = "the static request not met here" + (
            f": {', '.join(f'{describe(q)} {e:.2f}' for e, q in tried)}" if tried else "")
        tried.append((dynamic_error, token))
        if dynamic_error <= STATIC_ERROR_LIMIT:
            return token, f"{found}; {describe(token)} instead: error {dynamic_error:.2f} ({not_met})"
        if quantizer.spec.bits < FALLBACK_BITS:
            wider = token.respecified(bits=FALLBACK_BITS)
            tried.append((token_error(wider, self.sample), wider))
        candidate_error, candidate = min(tried, key=lambda entry: entry[0])
        return candidate, (f"{found}; nothing tried holds it: {describe(candidate)}, the least error "
                           f"({candidate_error:.2f}; {not_met})")


def granularity_name(quantizer: ActivationQuantizer) -> str:
    spec = quantizer.spec
    return f"{'dynamic' if spec.dynamic else 'static'} per {spec.granularity}"


def describe(quantizer: ActivationQuantizer) -> str:
    return f"int{quantizer.spec.bits} {granularity_name(quantizer)}"
