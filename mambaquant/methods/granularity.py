"""The activation granularity of each site: static per tensor, static per position or dynamic per token. For
"auto", `TokenStatistics.decide` chooses per site from its full-precision token maxima and says why."""

import torch

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
