"""Quamba2 (Chiang et al., ICML 2025), for Mamba-2 blocks: sort-and-cluster of the scan input x (inside each B/C
group, heads are clustered by their range and reordered so each cluster is contiguous; inside each head cluster,
channels are clustered the same way; each (group, head cluster, channel cluster) shares one static scale), one
static scale per group for B and for C, an online Hadamard at the out_proj input, GPTQ weights
(`WEIGHT_ROUNDING`). The reordering is fused into the weights (`transforms.reorder`). Where ours differs from the
paper's: docs/methods.md."""

import torch

from ..transforms.klt import AbsMaxObserver
from ..transforms.reorder import reorder_heads_and_channels
from ..transforms.rotation import rotate_out_proj_input
from .config import QuantConfig, QuantReport
from .stages import Runner, by_layer_kind, no_op


def cluster_sorted(values: torch.Tensor, k: int) -> torch.Tensor:
    """Optimal 1-D k-means of ascending `values` into at most k contiguous clusters (least total squared distance
    to the cluster means, by dynamic programming): a cluster index per value, non-decreasing."""
    n = len(values)
    k = min(k, n)
    v = values.double()
    prefix = [0.0] + v.cumsum(0).tolist()
    prefix2 = [0.0] + (v * v).cumsum(0).tolist()

    def cost(i: int, j: int) -> float:  # values[i:j] as one cluster
        total = prefix[j] - prefix[i]
        return prefix2[j] - prefix2[i] - total * total / (j - i)

    best = [[float("inf")] * (n + 1) for _ in range(k + 1)]
    split = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            for i in range(c - 1, j):
                candidate = best[c - 1][i] + cost(i, j)
                if candidate < best[c][j]:
                    best[c][j], split[c][j] = candidate, i
    labels = torch.empty(n, dtype=torch.long)
    j = n
    for c in range(k, 0, -1):
        i = split[c][j]
        labels[i:j] = c - 1
        j = i
    return labels


def sort_and_cluster(absmax: torch.Tensor, config, head_clusters: int, channel_clusters: int):
    """From the per-channel |x| max (d_ssm,): the head order (H,), each new head place's channel order (H, P), and
    the cluster index of every channel after reordering (d_ssm,)."""
    H, P, G = config.n_heads, config.head_dim, config.n_groups
    per_group = H // G
    ranges = absmax.view(H, P).clamp(min=1e-12).log()
    head_order, channel_orders, clusters = [], [], []
    next_cluster = 0
    for g in range(G):
        heads = torch.arange(g * per_group, (g + 1) * per_group)
        head_max = ranges[heads].amax(1)
        by_range = heads[head_max.argsort()]
        head_labels = cluster_sorted(head_max.sort().values, head_clusters)
        for label in head_labels.unique():
            members = by_range[head_labels == label]
            channel_max = ranges[members].amax(0)
            order = channel_max.argsort()
            channel_labels = cluster_sorted(channel_max[order], channel_clusters)
            for head in members:
                head_order.append(int(head))
                channel_orders.append(order)
                clusters.append(channel_labels + next_cluster)
            next_cluster += int(channel_labels.max()) + 1
    return torch.tensor(head_order), torch.stack(channel_orders), torch.cat(clusters)


def quamba2_model(model, blocks, batches, config: QuantConfig, report: QuantReport) -> None:
    if config.target == "vllm":
        report.transforms.append("per block: online Hadamard at out_proj input (its scan-input clusters and B/C "
                                 "group scales are at sites vLLM does not quantize)")
    if not config.online_transforms:  # an engine quantizes no scan operand: nothing to cluster
        return
    report.transforms.append(
        f"per block: sort-and-cluster of the scan input x (up to {config.head_clusters} head clusters x "
        f"{config.channel_clusters} channel clusters per B/C group, heads and channels reordered in the weights, "
        "one static scale per cluster), one static scale per group for B and C, online Hadamard at out_proj input")


def quamba2_mamba2(layer, mixer, runner: Runner, config: QuantConfig, report: QuantReport) -> dict:
    c = mixer.config
    if not config.online_transforms:
        if config.online_input_hadamards:
            rotate_out_proj_input(mixer)
        return {}
    absmax = AbsMaxObserver()
    runner.observe({mixer.sites["x"]: absmax})
    head_order, channel_orders, x_clusters = sort_and_cluster(absmax.absmax, c, config.head_clusters,
                                                              config.channel_clusters)
    reorder_heads_and_channels(mixer, head_order, channel_orders)
    rotate_out_proj_input(mixer)
    groups = torch.arange(c.n_groups * c.d_state) // c.d_state
    return {mixer.sites["x"]: x_clusters, mixer.sites["B"]: groups, mixer.sites["C"]: groups}


RECIPE = (quamba2_model, by_layer_kind(mamba2=quamba2_mamba2), no_op)
