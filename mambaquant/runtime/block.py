"""A pre-norm residual Mamba block: residual + mixer(norm(residual)) (or mixer(norm(x)) without the residual
connection), with a Mamba-1 or a Mamba-2 mixer."""

import torch
from torch import nn

from .config import Mamba2Config, MambaConfig
from .conv import SSMState
from .mixer import MambaMixer
from .mixer2 import Mamba2Mixer
from .sites import make_sites


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class NoNorm(nn.Identity):
    """A block or final norm left out (norm "none"): the identity, with nothing to fuse."""


def make_norm(config: MambaConfig | Mamba2Config, kind: str | None = None) -> nn.Module:
    kind = kind or config.norm
    if kind == "rms":
        return RMSNorm(config.d_model, config.norm_eps)
    if kind == "layer":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return NoNorm()


class MambaBlock(nn.Module):
    def __init__(self, config: MambaConfig | Mamba2Config):
        super().__init__()
        self.sites = make_sites("residual", "norm", "out")
        self.norm = make_norm(config)
        self.mixer = Mamba2Mixer(config) if isinstance(config, Mamba2Config) else MambaMixer(config)
        self.residual = config.residual

    forward_order = ("sites.residual", "norm", "sites.norm", "mixer", "sites.out")

    def forward(self, residual: torch.Tensor, state: SSMState | None = None) -> torch.Tensor:
        residual = self.sites.residual(residual)
        out = self.sites.out(self.mixer(self.sites.norm(self.norm(residual)), state))
        return residual + out if self.residual else out
