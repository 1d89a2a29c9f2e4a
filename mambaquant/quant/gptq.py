"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs, H = 2 X^T X / n."""

import torch

from ..errors import InputError
from .quantizer import QuantSpec, quantize, weight_scale_and_zero


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, second_moment: torch.Tensor, spec: QuantSpec, block_size: int = 128,
                  damping: float = 0.01, clip: torch.Tensor | None = None,
                  act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes (out, in) and scales ((out, 1), or (out, groups, 1) per group) of the weight given the inputs'
    second moment X^T X / n (in, in). `clip`: ratios shrinking the scales, shaped like them (`clipping.weight_clip`).
    `act_order` quantizes the columns in order of decreasing input energy (the Hessian's diagonal): the largest
    errors are made first, while the most columns are left to absorb them. Per output channel only: group scales
    are taken as the columns arrive, so a permuted order would mix the groups."""
    if act_order and spec.granularity == "group":
        raise InputError("GPTQ activation ordering works with per-channel weight scales, not with groups")
    W = weight.detach().clone().double()
    H = 2 * second_moment.detach().clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else None
    if order is not None:
        W, H = W[:, order], H[order][:, order]
    H += damping * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    H_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    columns = W.shape[1]
    grouped = spec.granularity == "group"
    if not spec.symmetric:
        raise InputError("weights are quantized symmetrically (integer codes times a scale, no zero point)")
    clip = None if clip is None else clip.double()
    scale, zero = (None, None) if grouped else weight_scale_and_zero(W, spec, clip)
    codes, group_scales = torch.zeros_like(W), []
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        W_block, errors = W[:, start:stop].clone(), torch.zeros_like(W[:, start:stop])
        H_block = H_inv[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if grouped and column % spec.group_size == 0:
                merged = torch.cat([W_block[:, i:], W[:, stop:]], 1)[:, : spec.group_size]
                scale, zero = weight_scale_and_zero(merged, QuantSpec(**{**spec.__dict__, "granularity": "channel"}),
                                                    None if clip is None else clip[:, column // spec.group_size])
                group_scales.append(scale)
            w = W_block[:, i : i + 1]
            codes[:, column : column + 1] = quantize(w, scale, zero, spec)
            q = codes[:, column : column + 1] * scale
            error = (w - q) / H_block[i, i]
            W_block[:, i:] -= error @ H_block[i : i + 1, i:]
            errors[:, i : i + 1] = error
        W[:, stop:] -= errors @ H_inv[start:stop, stop:]
    scales = torch.stack(group_scales, 1) if grouped else scale
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    return codes.to(torch.int8), scales.to(weight.dtype)
