"""Clipping ratios searched on calibration data: a weight's scale per output channel shrunk to minimise the layer's
output error on the calibration inputs, an activation quantizer's range shrunk to minimise the squared error at
its site. At 4 bits the largest values cost every other value half its resolution; clipping them buys it back. Both
are grid searches in closed form (no training), and both live in the scales: nothing changes at run time."""

import torch

from .quantizer import (ActivationQuantizer, QuantSpec, dequantize_weight, group_view, quantize_weight,
                        weight_scale_and_zero)

RATIOS = tuple(round(1 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5
SAMPLE_PER_CALL, SAMPLE_TOTAL = 1 << 16, 1 << 22  # elements an activation search keeps per tensor seen, in all


@torch.no_grad()
def weight_clip(weight: torch.Tensor, second_moment: torch.Tensor | None, spec: QuantSpec,
                ratios=RATIOS) -> torch.Tensor:
    """The ratio per output channel (per group, for group scales), shaped like the scales, that minimises the
    channel's output error on the inputs: (W - Q(W)) X^T X (W - Q(W))^T / n, the diagonal of X^T X / n alone for
    group scales (whose groups are chosen one by one); plain squared weight error without inputs."""
    W = weight.detach().float()
    ones = torch.ones_like(weight_scale_and_zero(W, spec)[0])
    best_error, best = None, None
    for ratio in ratios:
        clip = ones * ratio
        error = W - dequantize_weight(*quantize_weight(W, spec, clip))
        if spec.granularity == "group":
            weighted = error**2 * (torch.diag(second_moment)[None] if second_moment is not None else 1)
            per_scale = group_view(weighted, spec).sum(-1, keepdim=True)
        elif second_moment is not None:
            per_scale = ((error @ second_moment.float()) * error).sum(1, keepdim=True)
        else:
            per_scale = (error**2).sum(1, keepdim=True)
        if best_error is None:
            best_error, best = per_scale, clip
            continue
        better = per_scale < best_error
        best_error, best = torch.where(better, per_scale, best_error), torch.where(better, ratio, best)
    return best


class SiteSample:
    """A site observer keeping a strided subsample of the tokens it sees (every position of the first sample, for
    per-position ranges), `SAMPLE_PER_CALL` elements per tensor seen and `SAMPLE_TOTAL` in all: the data an
    activation clipping search scores (the scan's state h passes its sites once per chunk of time steps)."""

    def __init__(self, per_position: bool):
        self.per_position, self.samples, self.kept = per_position, [], 0

    @torch.no_grad()
    def __call__(self, site, x: torch.Tensor) -> None:
        if self.kept >= SAMPLE_TOTAL:
            return
        x = x.detach()
        if self.per_position:
            kept = x[:1].float()
        else:
            tokens = x.flatten(0, 1)
            step = max(1, -(-tokens.numel() // SAMPLE_PER_CALL))
            kept = tokens[::step].unsqueeze(0).float()
        self.samples.append(kept.clone())
        self.kept += kept.numel()


@torch.no_grad()
def activation_clip(quantizer: ActivationQuantizer, sample: SiteSample,
                    ratios=RATIOS) -> tuple[float, float, float]:
    """(ratio, its squared error, the unclipped range's): the clipping ratio that minimises the squared
    quantization error over the sampled tensors, the quantizer's own ranges (static or per token) shrunk by it."""
    errors = {}
    for ratio in ratios:
        trial = quantizer.respecified(clip=ratio)
        errors[ratio] = sum(((trial(x) - x) ** 2).sum().item() for x in sample.samples)
    best = min(errors, key=errors.get)
    return best, errors[best], errors[1.0]
