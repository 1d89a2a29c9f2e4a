"""The Mamba-1 mixer: in_proj -> (selective SSM on x) * SiLU(z) -> out_proj, with every quantizable tensor at a site."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MambaConfig
from .scan import selective_scan, selective_scan_reference, selective_scan_trainable
from .sites import make_sites


@dataclass
class SSMState:
    """Recurrent state of one SSM branch between calls: the last d_conv-1 conv inputs and the scan state h."""

    conv: torch.Tensor  # (B, d_conv - 1, E)
    h: torch.Tensor  # (B, E, N)


class SelectiveSSM(nn.Module):
    """conv1d + SiLU -> x_proj (dt, B, C) -> dt_proj + softplus -> selective scan -> + D skip.
    With `both_ways` the same inputs are also scanned backwards in time and the two results added."""

    def __init__(self, config: MambaConfig, both_ways: bool = False):
        super().__init__()
        E, N, R = config.d_inner, config.d_state, config.dt_rank
        self.d_state, self.dt_rank = N, R
        self.causal = config.conv == "causal"
        self.dt_offset = config.dt_offset
        self.both_ways = both_ways
        self.conv1d = nn.Conv1d(E, E, config.d_conv, groups=E, bias=config.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=config.x_proj_bias)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.zeros(E, N))
        self.D = nn.Parameter(torch.ones(E))
        self.sites = make_sites("conv", "x_proj_in", "dt_low", "B", "C", "dt", "dA", "dBu", "h", "hC", "y")
        self.reference_scan = False

    def conv(self, x: torch.Tensor, state: SSMState | None) -> torch.Tensor:
        """Depthwise convolution in (B, L, E) layout: out_t = bias + sum_k w_k x_{t+k-P}, with P = K-1 (causal)
        or (K-1)//2 ("same", zero padding on both sides)."""
        K = self.conv1d.kernel_size[0]
        before = K - 1 if self.causal else (K - 1) // 2
        past = state.conv if state is not None else x.new_zeros(x.shape[0], before, x.shape[2])
        future = x.new_zeros(x.shape[0], K - 1 - before, x.shape[2])
        padded = torch.cat([past, x, future], dim=1)
        weight = self.conv1d.weight[:, 0, :]  # (E, K)
        length = x.shape[1]
        out = padded[:, 0:length] * weight[:, 0]
        for k in range(1, K):
            out.addcmul_(padded[:, k : k + length], weight[:, k])
        if self.conv1d.bias is not None:
            out += self.conv1d.bias
        if state is not None:
            state.conv = padded[:, padded.shape[1] - before :]
        return out

    def scan(self, u, dt, A, B, C, state: SSMState | None) -> torch.Tensor:
        sites = self.sites
        hooks = {f"{kind}_hook": sites[kind] for kind in ("dA", "dBu", "h") if sites[kind].active}
        if torch.is_grad_enabled() and state is None and not hooks and not self.reference_scan:
            return selective_scan_trainable(u, dt, A, B, C)
        scan = selective_scan_reference if self.reference_scan else selective_scan
        hC, h = scan(u, dt, A, B, C, state=state.h if state is not None else None, **hooks)
        if state is not None:
            state.h = h
        return hC

    def forward(self, x: torch.Tensor, state: SSMState | None = None) -> torch.Tensor:
        sites = self.sites
        u = sites.conv(F.silu(self.conv(x, state)))
        dt_low, B, C = self.x_proj(sites.x_proj_in(u)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_low, B, C = sites.dt_low(dt_low), sites.B(B), sites.C(C)
        dt = sites.dt(F.softplus(self.dt_proj(dt_low)) + self.dt_offset)
        A = -torch.exp(self.A_log.float())
        hC = self.scan(u, dt, A, B, C, state)
        skip = u * self.D
        if self.both_ways:
            hC = hC + self.scan(u.flip(1), dt.flip(1), A, B.flip(1), C.flip(1), None).flip(1)
            skip = 2 * skip
        return sites.y(sites.hC(hC) + skip)


class MambaMixer(nn.Module):
    """in_proj -> x, z; y = SSM(x) (with a separate reversed-sequence branch: averaged, or added when not
    `divide_out`); out_proj(y * SiLU(z))."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.in_proj = nn.Linear(config.d_model, 2 * config.d_inner, bias=config.bias)
        self.ssm = SelectiveSSM(config, both_ways=config.bidirectional == "shared")
        self.ssm_b = SelectiveSSM(config) if config.bidirectional == "separate" else None
        self.divide_out = config.divide_out
        self.out_proj = nn.Linear(config.d_inner, config.d_model, bias=config.bias)
        self.register_buffer("gate_scale", None)  # S-SiLU: gate = z * sigmoid(gate_scale * z) (smooth-fused rotation)
        self.sites = make_sites("x", "z", "gate", "out_proj_in")

    def forward(self, hidden: torch.Tensor, state: SSMState | None = None) -> torch.Tensor:
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x, z = self.sites.x(x), self.sites.z(z)
        y = self.ssm(x, state)
        if self.ssm_b is not None:
            y_b = self.ssm_b(x.flip(1)).flip(1)
            y = (y + y_b) / 2 if self.divide_out else y + y_b
        gate = F.silu(z) if self.gate_scale is None else z * torch.sigmoid(self.gate_scale * z)
        gate = self.sites.gate(gate)
        return self.out_proj(self.sites.out_proj_in(y * gate))
