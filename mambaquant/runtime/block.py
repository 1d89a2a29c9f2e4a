"""Pre-norm residual blocks: residual + mixer(norm(residual)) (or mixer(norm(x)) without the residual connection),
the mixer a Mamba-1 or Mamba-2 mixer (`MambaBlock`) or any layer kind of a hybrid model (`Block`)."""

import torch
from torch import nn

from .config import Mamba2Config, MambaConfig
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


class CenteredRMSNorm(nn.Module):
    """weight * y / sqrt(mean(y^2) + eps), y = x - (x . u) u: an RMSNorm of the input's component orthogonal to a
    unit direction u (the buffer `direction`). With u the all-ones direction 1/sqrt(D) it is a LayerNorm without
    bias; a rotation x -> x M of its input keeps its function when u turns with it (u -> u M), which a LayerNorm's
    fixed centring does not. Norm fusion makes one of a final LayerNorm that reads a stream not every reader of
    which is a LayerNorm (so that the stream cannot be centred offline): final norm "centered"."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("direction", torch.full((dim,), dim**-0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x - (x @ self.direction)[..., None] * self.direction
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps))


class NoNorm(nn.Identity):
    """A block or final norm left out (norm "none"): the identity, with nothing to fuse."""


def make_norm(config: MambaConfig | Mamba2Config, kind: str | None = None) -> nn.Module:
    kind = kind or config.norm
    if kind == "rms":
        return RMSNorm(config.d_model, config.norm_eps)
    if kind == "layer":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    if kind == "centered":
        return CenteredRMSNorm(config.d_model, config.norm_eps)
    return NoNorm()


class Block(nn.Module):
    """A pre-norm residual block around any mixer (a Mamba mixer, attention, an MLP or a mixture of experts):
    residual + multiplier * mixer(norm(residual)), or the mixer's output alone without the residual connection.
    A mixer that keeps no state between calls (an MLP) is called without one."""

    reads_embedding = False  # only the hidden state (MambaLM: see ZambaHybridBlock)

    def __init__(self, norm: nn.Module, mixer: nn.Module, residual: bool = True, multiplier: float = 1.0):
        super().__init__()
        self.sites = make_sites("residual", "norm", "out")
        self.norm, self.mixer = norm, mixer
        self.residual, self.multiplier = residual, multiplier

    forward_order = ("sites.residual", "norm", "sites.norm", "mixer", "sites.out")

    def forward(self, residual: torch.Tensor, state=None) -> torch.Tensor:
        residual = self.sites.residual(residual)
        normed = self.sites.norm(self.norm(residual))
        out = self.sites.out(self.mixer(normed) if state is None else self.mixer(normed, state))
        if self.multiplier != 1.0:
            out = out * self.multiplier
        return residual + out if self.residual else out

    def input_layers(self) -> list[nn.Module]:
        """The layers that read the block norm's output: each weight's columns (its last dimension) are the channels
        of the residual stream, so a transform of the stream fuses into them (norm scales, smoothing, rotations)."""
        return self.mixer.input_layers()

    def output_layers(self) -> list[nn.Linear]:
        """The linear layers whose outputs are the block's contribution to the residual stream (their rows)."""
        return self.mixer.output_layers()

    def norm_readers(self) -> list[tuple[nn.Module, list[nn.Module], nn.Module]]:
        """Each norm of the block with the layers reading its output and the site carrying that output: where norm
        scales fuse and smoothing balances (one norm here; Zamba2's hybrid layer has three)."""
        return [(self.norm, self.input_layers(), self.sites["norm"])]

    def new_state(self, batch_size: int):
        """The mixer's state for decoding (a Mamba mixer's SSMState, attention's KVCache), None for a stateless one."""
        return self.mixer.new_state(batch_size) if hasattr(self.mixer, "new_state") else None


class MambaBlock(Block):
    """A block of a Mamba-1 or Mamba-2 stack, its norm and mixer from the stack's config."""

    def __init__(self, config: MambaConfig | Mamba2Config):
        mixer = Mamba2Mixer(config) if isinstance(config, Mamba2Config) else MambaMixer(config)
        super().__init__(make_norm(config), mixer, config.residual)
