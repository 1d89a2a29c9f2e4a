"""The low-rank adapter Zamba2 adds beside each projection of its shared attention and MLP block."""

import torch
from torch import nn


class LowRankAdapter(nn.Module):
    """up(down(x)), added to a projection's output: one adapter per use of a block whose projections are shared by
    several layers (LoRA without a scale)."""

    def __init__(self, d_in: int, rank: int, d_out: int):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))
