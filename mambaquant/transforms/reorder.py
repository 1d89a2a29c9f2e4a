"""Function-preserving reordering of a Mamba-2 mixer's heads and of the channels inside them (Quamba2's
sort-and-cluster: channels that share a quantization scale become contiguous).

A head may move only inside its B/C group (it reads that group's B and C), which is also its gated norm's group,
so the norm's statistics do not change. Moving head j to place i moves its x rows (in_proj and the conv), its z
rows, its dt row, dt_bias, A_log, D, its gated norm weights and out_proj's columns; a channel moved inside its
head moves its x row, z row, conv channel, norm weight and out_proj column.
"""

import torch
from torch import nn


def channel_order(head_order: torch.Tensor, channel_orders: torch.Tensor) -> torch.Tensor:
    """The order of the d_ssm channels for `head_order` (H,) and, per new head place, the order of its P channels
    (H, P): new channel (i, p) is old channel (head_order[i], channel_orders[i, p])."""
    head_dim = channel_orders.shape[1]
    return (head_order[:, None] * head_dim + channel_orders).flatten()


def check_order(mixer: nn.Module, head_order: torch.Tensor, channel_orders: torch.Tensor) -> None:
    c = mixer.config
    per_group = c.n_heads // c.n_groups
    groups = head_order // per_group
    if sorted(head_order.tolist()) != list(range(c.n_heads)) or not torch.equal(groups, torch.arange(c.n_heads)
                                                                                  // per_group):
        raise ValueError("a head order must be a permutation that keeps every head inside its group")
    if not torch.equal(channel_orders.sort(1).values, torch.arange(c.head_dim).expand(c.n_heads, -1)):
        raise ValueError("each head's channel order must be a permutation of its channels")


@torch.no_grad()
def reorder_heads_and_channels(mixer: nn.Module, head_order: torch.Tensor, channel_orders: torch.Tensor) -> None:
    check_order(mixer, head_order, channel_orders)
    c, rows = mixer.config, mixer.config.in_proj_rows()
    order = channel_order(head_order, channel_orders)

    def permute_rows(tensor: torch.Tensor, start: int, permutation: torch.Tensor) -> None:
        part = tensor[start:start + len(permutation)]
        part.copy_(part[permutation])

    for tensor in (mixer.in_proj.weight, mixer.in_proj.bias):
        if tensor is not None:
            permute_rows(tensor, rows["z"].start, order)
            permute_rows(tensor, rows["xBC"].start, order)  # x comes first in x B C
            permute_rows(tensor, rows["dt"].start, head_order)
    for tensor in (mixer.conv1d.weight, mixer.conv1d.bias):
        if tensor is not None:
            permute_rows(tensor, 0, order)
    for tensor in (mixer.dt_bias, mixer.A_log, mixer.D):
        permute_rows(tensor, 0, head_order)
    if mixer.norm is not None:
        permute_rows(mixer.norm.weight, 0, order)
    columns = mixer.out_proj.weight.T  # a view: out_proj's input columns as rows
    permute_rows(columns, c.d_mlp, order)
