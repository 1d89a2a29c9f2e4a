"""Function-preserving channel smoothing (SmoothQuant): divide an activation's channels by s and multiply the
consumer weight's input columns by s; the division is fused into the producer, so it costs nothing at run time.

- in_proj input (and head input): the preceding norm's scale (online where the model has no norm there);
- out_proj input: the smooth-fused rotation's S-SiLU. in_proj's z rows are divided by s and the gate becomes
  z * sigmoid(s * z), which is SiLU(z) / s exactly;
- conv1d input: in_proj's x rows divided by s, the depthwise conv weights multiplied by s;
- dt_proj input: x_proj's dt rows;
- h*C (per state channel): x_proj's B rows divided by s, its C rows multiplied by s, so h' = h / s and
  h' * (s C) = h * C (zero initial state).

Mamba-2 (`*_mamba2`): the in_proj input as above; the out_proj input: the gated RMSNorm's weight (and the MLP
part's input rows of in_proj); the conv1d input: in_proj's x B C rows and the conv weights; C.h: B and C leave the
conv through a SiLU, which no scale passes exactly, so the per-(group, state channel) scales are applied online
(`Scale` ops at the B and C sites: two multiplies per element of B and C, G x N per token each).
"""

import torch
from torch import nn

from .rotation import append_op


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


class Scale(nn.Module):
    """x -> x * scale along the last dim: an online smoothing vector where no producer can absorb it."""

    per_token = True  # each token on its own (see `Site.per_token`)

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{len(self.scale)}"


@torch.no_grad()
def divide_rows(linear: nn.Linear, rows: slice, s: torch.Tensor) -> None:
    """The producer's side of a smoothing: the outputs `rows` of `linear` divided by s."""
    linear.weight[rows] /= s[:, None]
    if linear.bias is not None:
        linear.bias[rows] /= s


@torch.no_grad()
def smooth_norm_output(norm: nn.Module, readers: list[nn.Module], s: torch.Tensor, site) -> None:
    """The norm's scale (and bias) divided by s, the columns of every layer reading it multiplied by s; where there
    is no norm, an online division at its output `site` (s > 0, so it passes a max pooling too)."""
    if isinstance(norm, nn.Identity):
        append_op(site, Scale(1 / s))
    else:
        norm.weight.div_(s)
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s)
    for reader in readers:
        reader.weight.mul_(s)


def readers_weight(readers: list[nn.Module]) -> torch.Tensor:
    """The weights of the layers reading one activation, stacked by rows: the "weight" its smoothing balances."""
    return torch.cat([reader.weight for reader in readers])


def value_smoothing_scales(attention: nn.Module, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s between v and o_proj, one per value channel (kv head, channel): from the o_proj input's range
    and o_proj's columns, both pooled over the query heads of each group."""
    c = attention.config
    per_group = c.n_heads // c.n_kv_heads
    by_group = act_absmax.view(c.n_kv_heads, per_group, c.head_dim).amax(1).flatten()
    columns = attention.o_proj.weight.view(-1, c.n_kv_heads, per_group, c.head_dim).transpose(1, 2)
    return smoothing_scales(by_group, columns.reshape(-1, c.n_kv_heads * c.head_dim), alpha)


def per_query_head(attention: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """A value channel's s for each query head that reads it: the o_proj input's layout (H*P)."""
    c = attention.config
    return s.view(c.n_kv_heads, 1, c.head_dim).expand(-1, c.n_heads // c.n_kv_heads, -1).flatten()


@torch.no_grad()
def smooth_values(attention: nn.Module, act_absmax: torch.Tensor, alpha: float) -> None:
    """SmoothQuant between v and o_proj: each value channel (kv head, channel) divided by s in v_proj's rows, every
    query head of its group reading it so scaled, o_proj's columns of those heads multiplied by s
    (`value_smoothing_scales`)."""
    s = value_smoothing_scales(attention, act_absmax, alpha)
    for writer in attention.value_layers():
        divide_rows(writer, slice(None), s)
    attention.o_proj.weight.mul_(per_query_head(attention, s))


def down_input_smoothable(mlp: nn.Module) -> bool:
    """Whether a scale passes the MLP's activation into up_proj's rows: gated, or squared ReLU (`smooth_down_input`)."""
    return mlp.gate_proj is not None or mlp.config.activation == "relu2"


@torch.no_grad()
def smooth_down_input(mlp: nn.Module, act_absmax: torch.Tensor, alpha: float) -> bool:
    """SmoothQuant at down_proj's input, fused into up_proj's rows: act(gate) * up / s in a gated MLP; in a
    squared-ReLU one relu(up / sqrt(s))^2 = relu(up)^2 / s (a positive scale passes the ReLU). Any other ungated
    activation passes no scale: False, nothing done."""
    if not down_input_smoothable(mlp):
        return False
    s = smoothing_scales(act_absmax, mlp.down_proj.weight, alpha)
    divide_rows(mlp.up_proj, slice(None), s if mlp.gate_proj is not None else s.sqrt())
    if mlp.adapter is not None:  # Zamba2's, gated only: its rows after d_ff add to up
        divide_rows(mlp.adapter.up, slice(mlp.config.d_ff, None), s)
    mlp.down_proj.weight.mul_(s)
    return True


@torch.no_grad()
def smooth_gate(mixer: nn.Module, s: torch.Tensor) -> None:
    """S-SiLU: out_proj input y * SiLU(z) -> y * SiLU(z) / s, with out_proj's columns multiplied by s."""
    divide_rows(mixer.in_proj, slice(mixer.out_proj.in_features, None), s)
    scale = s if mixer.gate_scale is None else mixer.gate_scale * s
    mixer.gate_scale = scale.clone()
    mixer.out_proj.weight.mul_(s)


@torch.no_grad()
def smooth_conv_input(mixer: nn.Module, ssms: list[nn.Module], s: torch.Tensor) -> None:
    divide_rows(mixer.in_proj, slice(0, mixer.out_proj.in_features), s)
    for ssm in ssms:
        if ssm.conv1d is not None:  # a shared-conv backward branch reads the forward branch's conv
            ssm.conv1d.weight.mul_(s[:, None, None])


@torch.no_grad()
def smooth_dt_input(ssm: nn.Module, s: torch.Tensor) -> None:
    """dt_low / s, dt_proj's columns * s. Behind FalconMamba's weight-less norm (`inner_norm_eps`), which a scale
    of its input does not pass, the division is an online op at the dt_low site (dt_rank products per token)."""
    if ssm.inner_norm_eps:
        append_op(ssm.sites["dt_low"], Scale(1 / s))
    else:
        divide_rows(ssm.x_proj, slice(0, ssm.dt_rank), s)
    ssm.dt_proj.weight.mul_(s)


@torch.no_grad()
def smooth_state(ssm: nn.Module, s: torch.Tensor) -> None:
    """B / s (so h / s) and C * s; online at the B and C sites behind FalconMamba's weight-less norms."""
    R, N = ssm.dt_rank, ssm.d_state
    if ssm.inner_norm_eps:
        append_op(ssm.sites["B"], Scale(1 / s))
        append_op(ssm.sites["C"], Scale(s.clone()))
        return
    divide_rows(ssm.x_proj, slice(R, R + N), s)
    divide_rows(ssm.x_proj, slice(R + N, R + 2 * N), 1 / s)


@torch.no_grad()
def smooth_conv_input_mamba2(mixer: nn.Module, s: torch.Tensor) -> None:
    divide_rows(mixer.in_proj, mixer.config.in_proj_rows()["xBC"], s)
    mixer.conv1d.weight.mul_(s[:, None, None])


@torch.no_grad()
def smooth_gated_norm(mixer: nn.Module, s: torch.Tensor) -> None:
    """out_proj input [SiLU(z0) * x0 | norm(y * SiLU(z))] / s: the MLP part through in_proj's x0 rows, the rest
    through the gated norm's weight; out_proj's columns multiplied by s. A mixer without the gated norm (Falcon-H1's
    mamba_rms_norm false) has no weight there: the division is an online op at the out_proj input."""
    mixer.out_proj.weight.mul_(s)
    if mixer.norm is None:
        append_op(mixer.sites["out_proj_in"], Scale(1 / s))
        return
    d_mlp = mixer.config.d_mlp
    divide_rows(mixer.in_proj, mixer.config.in_proj_rows()["mlp_in"], s[:d_mlp])
    mixer.norm.weight.div_(s[d_mlp:])


@torch.no_grad()
def smooth_state_mamba2(mixer: nn.Module, s: torch.Tensor) -> None:
    """C.h per (group, state channel), s of size n_groups x d_state: B / s online (so h' = h / s), C * s online."""
    append_op(mixer.sites["B"], Scale(1 / s))
    append_op(mixer.sites["C"], Scale(s.clone()))
