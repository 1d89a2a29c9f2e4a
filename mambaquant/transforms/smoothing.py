"""Function-preserving channel smoothing (SmoothQuant): divide an activation's channels by s and multiply the
consumer weight's input columns by s; the division is fused into the producer, so it costs nothing at run time.

- in_proj input (and head input): the preceding norm's scale;
- out_proj input: the smooth-fused rotation's S-SiLU. in_proj's z rows are divided by s and the gate becomes
  z * sigmoid(s * z), which is SiLU(z) / s exactly;
- conv1d input: in_proj's x rows divided by s, the depthwise conv weights multiplied by s;
- dt_proj input: x_proj's dt rows;
- h*C (per state channel): x_proj's B rows divided by s, its C rows multiplied by s, so h' = h / s and
  h' * (s C) = h * C (zero initial state).
"""

import torch
from torch import nn


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor | None, alpha: float = 0.5,
                     minimum: float = 1e-2) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), clamped to at least `minimum` (and to the activation range
    where a weight column is all zero). Without a weight, s_j = max|X_j|^alpha."""
    s = act_absmax.clamp(min=1e-5) ** alpha
    if weight is not None:
        s = s / weight.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=minimum)


def state_smoothing_scales(h_absmax: torch.Tensor, c_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per state channel s = (max|h| / max|C|)^alpha, for h' = h / s and C' = C s: both operands of h*C are
    activations, so the range is shared between them."""
    return (h_absmax.clamp(min=1e-5) / c_absmax.clamp(min=1e-5)) ** alpha


@torch.no_grad()
def smooth_norm_output(norm: nn.Module, linear: nn.Linear, s: torch.Tensor) -> None:
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)
    linear.weight.mul_(s)


@torch.no_grad()
def smooth_gate(mixer: nn.Module, s: torch.Tensor) -> None:
    """S-SiLU: out_proj input y * SiLU(z) -> y * SiLU(z) / s, with out_proj's columns multiplied by s."""
    E = mixer.out_proj.in_features
    mixer.in_proj.weight[E:] /= s[:, None]
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias[E:] /= s
    scale = s if mixer.gate_scale is None else mixer.gate_scale * s
    mixer.gate_scale = scale.clone()
    mixer.out_proj.weight.mul_(s)


@torch.no_grad()
def smooth_conv_input(mixer: nn.Module, ssms: list[nn.Module], s: torch.Tensor) -> None:
    E = mixer.out_proj.in_features
    mixer.in_proj.weight[:E] /= s[:, None]
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias[:E] /= s
    for ssm in ssms:
        ssm.conv1d.weight.mul_(s[:, None, None])


@torch.no_grad()
def smooth_dt_input(ssm: nn.Module, s: torch.Tensor) -> None:
    R = ssm.dt_rank
    ssm.x_proj.weight[:R] /= s[:, None]
    if ssm.x_proj.bias is not None:
        ssm.x_proj.bias[:R] /= s
    ssm.dt_proj.weight.mul_(s)


@torch.no_grad()
def smooth_state(ssm: nn.Module, s: torch.Tensor) -> None:
    R, N = ssm.dt_rank, ssm.d_state
    B_rows, C_rows = slice(R, R + N), slice(R + N, R + 2 * N)
    ssm.x_proj.weight[B_rows] /= s[:, None]
    ssm.x_proj.weight[C_rows] *= s[:, None]
    if ssm.x_proj.bias is not None:
        ssm.x_proj.bias[B_rows] /= s
        ssm.x_proj.bias[C_rows] *= s
