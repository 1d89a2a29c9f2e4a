"""The Mamba-1 mixer: in_proj -> (selective SSM on x) * SiLU(z) -> out_proj, with every quantizable tensor at a site."""

import torch
import torch.nn.functional as F
from torch import nn

from .config import MambaConfig
from .conv import SSMState, depthwise_conv
from .scan import selective_scan, selective_scan_reference, selective_scan_trainable
from .sites import make_sites


class SelectiveSSM(nn.Module):
    """conv1d + SiLU -> x_proj (dt, B, C) -> dt_proj + softplus -> selective scan -> + D skip.
    With `both_ways` the same inputs are also scanned backwards in time and the two results added. Without
    `with_conv` the branch has no conv of its own: it scans another branch's conv output (`selective`). With
    `mixer_rms_eps` dt_low, B and C each pass an RMS norm right after x_proj: weight-less (FalconMamba), or with a
    weight each with `mixer_norm_weights` (Jamba)."""

    def __init__(self, config: MambaConfig, both_ways: bool = False, with_conv: bool = True):
        super().__init__()
        E, N, R = config.d_inner, config.d_state, config.dt_rank
        self.d_state, self.dt_rank = N, R
        self.causal = config.conv == "causal"
        self.dt_offset = config.dt_offset
        self.inner_norm_eps = config.mixer_rms_eps  # 0: no norms
        self.inner_norms = nn.ModuleDict({part: InnerRMSNorm(size, config.mixer_rms_eps) for part, size in
                                          (("dt", R), ("B", N), ("C", N))}) if config.mixer_norm_weights else None
        self.both_ways = both_ways
        self.conv1d = nn.Conv1d(E, E, config.d_conv, groups=E, bias=config.conv_bias) if with_conv else None
        self.x_proj = nn.Linear(E, R + 2 * N, bias=config.x_proj_bias)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.zeros(E, N))
        self.D = nn.Parameter(torch.ones(E))
        self.sites = make_sites("conv", "x_proj_in", "dt_low", "B", "C", "dt", "dA", "dBu", "h", "hC", "y")
        self.reference_scan = False

    def conv(self, x: torch.Tensor, state: SSMState | None) -> torch.Tensor:
        K = self.conv1d.kernel_size[0]
        return depthwise_conv(x, self.conv1d, K - 1 if self.causal else (K - 1) // 2, state)

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
        return self.selective(F.silu(self.conv(x, state)), state)

    def selective(self, u: torch.Tensor, state: SSMState | None = None) -> torch.Tensor:
        """The SSM on the conv output u = SiLU(conv1d(x))."""
        sites = self.sites
        u = sites.conv(u)
        dt_low, B, C = self.x_proj(sites.x_proj_in(u)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms is not None:
            dt_low, B, C = self.inner_norms.dt(dt_low), self.inner_norms.B(B), self.inner_norms.C(C)
        elif self.inner_norm_eps:
            dt_low, B, C = (weightless_rms_norm(t, self.inner_norm_eps) for t in (dt_low, B, C))
        dt_low, B, C = sites.dt_low(dt_low), sites.B(B), sites.C(C)
        dt = sites.dt(F.softplus(self.dt_proj(dt_low)) + self.dt_offset)
        A = -torch.exp(self.A_log.float())
        hC = self.scan(u, dt, A, B, C, state)
        skip = u * self.D
        if self.both_ways:
            hC = hC + self.scan(u.flip(1), dt.flip(1), A, B.flip(1), C.flip(1), None).flip(1)
            skip = 2 * skip
        return sites.y(sites.hC(hC) + skip)


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, computed in float32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class InnerRMSNorm(nn.Module):
    """Jamba's RMS norm, with a weight, on dt_low, B or C right after x_proj."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * weightless_rms_norm(x, self.eps)


class MambaMixer(nn.Module):
    """in_proj -> x, z; y = SSM(x) (with a reversed-sequence branch: averaged, or added when not `divide_out`);
    out_proj(y * SiLU(z)). The reversed branch `ssm_b` has its own conv ("separate") or scans the reversed output
    of the forward branch's conv ("shared-conv")."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.in_proj = nn.Linear(config.d_model, 2 * config.d_inner, bias=config.bias)
        self.ssm = SelectiveSSM(config, both_ways=config.bidirectional == "shared")
        self.shared_conv = config.bidirectional == "shared-conv"
        self.ssm_b = SelectiveSSM(config, with_conv=not self.shared_conv) \
            if config.bidirectional in ("separate", "shared-conv") else None
        self.divide_out = config.divide_out
        self.out_proj = nn.Linear(config.d_inner, config.d_model, bias=config.bias)
        self.register_buffer("gate_scale", None)  # S-SiLU: gate = z * sigmoid(gate_scale * z) (smooth-fused rotation)
        self.sites = make_sites("x", "z", "gate", "out_proj_in")
        self.d_conv, self.d_inner, self.d_state = config.d_conv, config.d_inner, config.d_state

    def new_state(self, batch_size: int) -> SSMState:
        weight = self.ssm.D  # in_proj may be a quantized linear: no float weight
        return SSMState(conv=weight.new_zeros(batch_size, self.d_conv - 1, self.d_inner),
                        h=weight.new_zeros(batch_size, self.d_inner, self.d_state))

    def input_layers(self) -> list[nn.Module]:
        """The layers reading the mixer's input (see `Block.input_layers`)."""
        return [self.in_proj]

    def output_layers(self) -> list[nn.Linear]:
        return [self.out_proj]

    forward_order = ("in_proj", "sites.x", "sites.z", "ssm", "ssm_b", "sites.gate", "sites.out_proj_in", "out_proj")

    def forward(self, hidden: torch.Tensor, state: SSMState | None = None) -> torch.Tensor:
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x, z = self.sites.x(x), self.sites.z(z)
        if self.shared_conv:
            u = F.silu(self.ssm.conv(x, state))
            y, y_b = self.ssm.selective(u, state), self.ssm_b.selective(u.flip(1)).flip(1)
        else:
            y = self.ssm(x, state)
            y_b = self.ssm_b(x.flip(1)).flip(1) if self.ssm_b is not None else None
        if y_b is not None:
            y = (y + y_b) / 2 if self.divide_out else y + y_b
        gate = F.silu(z) if self.gate_scale is None else z * torch.sigmoid(self.gate_scale * z)
        gate = self.sites.gate(gate)
        return self.out_proj(self.sites.out_proj_in(y * gate))
