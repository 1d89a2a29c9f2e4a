"""The feed-forward layer of the hybrid models: gated (SwiGLU and its GELU form) or not (Nemotron-H's squared
ReLU), with Falcon-H1's multipliers and Zamba2's adapter. Every quantizable tensor passes a site."""

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import LowRankAdapter
from .hybrid_config import MLPConfig
from .sites import make_sites


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu2": relu2}


class MLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        c = config
        self.config = c
        self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=c.bias) if c.gated else None
        self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=c.bias)
        self.adapter = LowRankAdapter(c.d_model, c.adapter_rank, 2 * c.d_ff) if c.adapter_rank else None
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=c.bias)
        self.act = ACTIVATIONS[c.activation]
        self.sites = make_sites("mlp_in", "down_in", table="mlp")

    forward_order = ("sites.mlp_in", "gate_proj", "up_proj", "adapter", "sites.down_in", "down_proj")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.config
        hidden = self.sites.mlp_in(hidden)
        up = self.up_proj(hidden)
        if self.gate_proj is None:
            inner = self.act(up)
        else:
            gate = self.gate_proj(hidden)
            if self.adapter is not None:
                gate_change, up_change = self.adapter(hidden).chunk(2, dim=-1)
                gate, up = gate + gate_change, up + up_change
            inner = self.act(gate * c.gate_multiplier) * up
        return self.down_proj(self.sites.down_in(inner)) * c.down_multiplier

    def input_layers(self) -> list[nn.Module]:
        """The layers reading the MLP's input (see `Block.input_layers`)."""
        layers = [self.gate_proj, self.up_proj] + ([self.adapter.down] if self.adapter is not None else [])
        return [layer for layer in layers if layer is not None]

    def output_layers(self) -> list[nn.Linear]:
        return [self.down_proj]
