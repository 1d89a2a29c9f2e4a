"""The Mamba-2 mixer: in_proj -> [z | x B C | dt]; conv1d + SiLU over x B C; the SSD scan per head; the gated
RMSNorm norm(y * SiLU(z)) per group (or Falcon-H1's norm(y) * SiLU(z), or no norm); out_proj. Every quantizable
tensor passes a site."""

import torch
import torch.nn.functional as F
from torch import nn

from .config import Mamba2Config
from .conv import SSMState, depthwise_conv
from .sites import make_sites
from .ssd import ssd_scan, ssd_scan_reference


class GroupRMSNorm(nn.Module):
    """RMSNorm over each group of `group_size` consecutive channels, one weight per channel (Mamba-2's gated norm,
    applied to y * SiLU(z): each of the n_groups groups of heads is normalised on its own)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.unflatten(-1, (-1, self.group_size))
        normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.flatten(-2)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        c = config
        self.config = c
        self.in_proj = nn.Linear(c.d_model, c.in_proj_size, bias=c.bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(c.n_heads))
        self.A_log = nn.Parameter(torch.zeros(c.n_heads))
        self.D = nn.Parameter(torch.ones(c.n_heads))
        self.norm = GroupRMSNorm(c.d_ssm, c.d_ssm // c.n_groups, c.norm_eps) if c.gated_norm != "none" else None
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)
        self.sites = make_sites("z", "xBC", "x", "B", "C", "dt", "h", "y", "gate", "out_proj_in", table="mamba2")
        self.reference_scan = False

    def new_state(self, batch_size: int) -> SSMState:
        c, weight = self.config, self.D  # in_proj may be a quantized linear: no float weight
        return SSMState(conv=weight.new_zeros(batch_size, c.d_conv - 1, c.conv_dim),
                        h=weight.new_zeros(batch_size, c.n_heads, c.head_dim, c.d_state))

    def input_layers(self) -> list[nn.Module]:
        """The layers reading the mixer's input (see `Block.input_layers`)."""
        return [self.in_proj]

    def output_layers(self) -> list[nn.Linear]:
        return [self.out_proj]

    def forward(self, hidden: torch.Tensor, state: SSMState | None = None) -> torch.Tensor:
        c, sites = self.config, self.sites
        batch, length = hidden.shape[:2]
        groups = c.n_groups * c.d_state
        mlp_gate, mlp_in, z, xBC, dt = self.in_proj(hidden).split(
            [c.d_mlp, c.d_mlp, c.d_ssm, c.conv_dim, c.n_heads], dim=-1)
        z, xBC = sites.z(z), sites.xBC(xBC)
        x, B, C = F.silu(depthwise_conv(xBC, self.conv1d, c.d_conv - 1, state)).split([c.d_ssm, groups, groups], -1)
        x, B, C = sites.x(x), sites.B(B), sites.C(C)
        dt = sites.dt(F.softplus(dt + self.dt_bias).clamp(c.dt_limit_min, c.dt_limit_max or None))
        A = -torch.exp(self.A_log.float())
        heads = x.view(batch, length, c.n_heads, c.head_dim)
        hC = self.scan(heads, dt, A, B.view(batch, length, c.n_groups, c.d_state),
                       C.view(batch, length, c.n_groups, c.d_state), state)
        y = sites.y((hC + heads * self.D[:, None]).flatten(2))
        gate = sites.gate(F.silu(z))
        if c.gated_norm == "after_gate":
            out = self.norm(y * gate)
        elif c.gated_norm == "before_gate":
            out = self.norm(y) * gate
        else:
            out = y * gate
        if c.d_mlp:
            out = torch.cat([F.silu(mlp_gate) * mlp_in, out], dim=-1)
        return self.out_proj(sites.out_proj_in(out))

    def scan(self, x, dt, A, B, C, state: SSMState | None) -> torch.Tensor:
        h_hook = self.sites.h if self.sites.h.active else None
        scan = ssd_scan_reference if self.reference_scan else ssd_scan
        hC, h = scan(x, dt, A, B, C, state=state.h if state is not None else None, h_hook=h_hook)
        if state is not None:
            state.h = h
        return hC
