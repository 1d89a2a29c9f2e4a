"""Falcon-H1's mixer: a Mamba-2 mixer and attention side by side on the same normed input, their outputs added.
(Falcon-H1's scalar multipliers around the two are folded into their weights when the model is loaded:
docs/runtime.md.)"""

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention, KVCache
from .conv import SSMState
from .mixer2 import Mamba2Mixer


@dataclass
class ParallelState:
    """The decoding state of both halves: the Mamba-2 mixer's recurrent state and the attention's KV cache."""

    ssm: SSMState
    kv: KVCache


class ParallelMixer(nn.Module):
    def __init__(self, mamba: Mamba2Mixer, attention: Attention):
        super().__init__()
        self.mamba, self.attention = mamba, attention

    forward_order = ("mamba", "attention")

    def new_state(self, batch_size: int) -> ParallelState:
        return ParallelState(ssm=self.mamba.new_state(batch_size), kv=self.attention.new_state(batch_size))

    def forward(self, hidden: torch.Tensor, state: ParallelState | None = None) -> torch.Tensor:
        if state is None:
            return self.mamba(hidden) + self.attention(hidden)
        return self.mamba(hidden, state.ssm) + self.attention(hidden, state.kv)

    def input_layers(self) -> list[nn.Module]:
        return self.mamba.input_layers() + self.attention.input_layers()

    def output_layers(self) -> list[nn.Linear]:
        return self.mamba.output_layers() + self.attention.output_layers()
