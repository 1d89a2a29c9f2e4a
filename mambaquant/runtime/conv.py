"""The depthwise convolution both block kinds run over time, and the recurrent state a block carries between calls."""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SSMState:
    """Recurrent state of one SSM branch between calls: the last d_conv-1 conv inputs and the scan state h
    ((B, E, N) for Mamba-1, (B, heads, head_dim, N) for Mamba-2)."""

    conv: torch.Tensor  # (B, d_conv - 1, channels)
    h: torch.Tensor


def depthwise_conv(x: torch.Tensor, conv1d: nn.Conv1d, before: int, state: SSMState | None) -> torch.Tensor:
    """Depthwise convolution in (B, L, C) layout: out_t = bias + sum_k w_k x_{t+k-before}, zero padding
    (`before` = K-1: causal; (K-1)//2: centred). With a state, its conv window stands in for the past and is
    updated to the last `before` inputs."""
    K = conv1d.kernel_size[0]
    past = state.conv if state is not None else x.new_zeros(x.shape[0], before, x.shape[2])
    future = x.new_zeros(x.shape[0], K - 1 - before, x.shape[2])
    padded = torch.cat([past, x, future], dim=1)
    weight = conv1d.weight[:, 0, :]  # (C, K)
    length = x.shape[1]
    out = padded[:, 0:length] * weight[:, 0]
    for k in range(1, K):
        out.addcmul_(padded[:, k : k + length], weight[:, k])
    if conv1d.bias is not None:
        out += conv1d.bias
    if state is not None:
        state.conv = padded[:, padded.shape[1] - before :]
    return out
