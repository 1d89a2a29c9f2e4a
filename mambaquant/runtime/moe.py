"""Top-k mixture of experts, the sparse feed-forward layer of GraniteMoeHybrid, Nemotron-H and Jamba: a float
router, experts stored as stacked (n_experts, out, in) weights and run for the tokens routed to each, a shared
expert, and Nemotron-H's latent projections. Every quantizable tensor passes a site.

Quantization holds the experts as an `ExpertList` instead: one `MLP` per expert (the same function), so that each
expert's linears are linears like any other, each with its own input sites and statistics."""

import torch
import torch.nn.functional as F
from torch import nn

from .hybrid_config import MLPConfig, MoEConfig
from .mlp import ACTIVATIONS, MLP
from .sites import make_sites, name_sites


class Router(nn.Module):
    """Each token's top_k experts and their weights, from float32 logits (the scorings: see MoEConfig)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.n_experts, config.d_model))
        bias = torch.zeros(config.n_experts) if config.score_correction else None
        self.register_buffer("score_correction_bias", bias)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (N, D) -> weights (N, top_k) in float32 and experts (N, top_k)."""
        c = self.config
        logits = F.linear(hidden.float(), self.weight.float())
        if c.scoring == "softmax" and c.norm_topk_prob:
            top, experts = logits.topk(c.top_k, dim=-1)
            weights = top.softmax(dim=-1)
        elif c.scoring == "softmax":
            weights, experts = logits.softmax(dim=-1).topk(c.top_k, dim=-1)
        else:
            scores = logits.sigmoid()
            choice = scores if self.score_correction_bias is None else scores + self.score_correction_bias
            if c.n_group > 1:
                choice = self.in_best_groups(choice)
            experts = choice.topk(c.top_k, dim=-1).indices
            weights = scores.gather(1, experts)
            if c.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, experts

    def in_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice (N, n_experts) with -inf outside each token's topk_group groups, a group scored by the sum of
        its two best choices."""
        c = self.config
        groups = choice.view(choice.shape[0], c.n_group, c.n_experts // c.n_group)
        best = groups.topk(2, dim=-1).values.sum(dim=-1).topk(c.topk_group, dim=-1).indices
        kept = torch.zeros(groups.shape[:2], dtype=torch.bool, device=choice.device).scatter_(1, best, True)
        return groups.masked_fill(~kept[..., None], float("-inf")).flatten(1)


class Experts(nn.Module):
    """n_experts MLPs (gated or not, no biases) stacked: gate_proj and up_proj (n_experts, d_ff, width), down_proj
    (n_experts, width, d_ff), width = d_model or the latent size."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        c = config
        shape = (c.n_experts, c.d_ff, c.expert_width)
        self.gate_proj = nn.Parameter(torch.zeros(shape)) if c.gated else None
        self.up_proj = nn.Parameter(torch.zeros(shape))
        self.down_proj = nn.Parameter(torch.zeros(c.n_experts, c.expert_width, c.d_ff))
        self.act = ACTIVATIONS[c.activation]
        self.sites = make_sites("expert_down_in", table="moe")

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """hidden (N, width), each token's weights and experts (N, top_k) -> the weighted sum of its experts'
        outputs (N, width). Only the experts some token chose run, in expert order."""
        out = torch.zeros_like(hidden)
        for expert in experts.unique().tolist():
            token, slot = torch.where(experts == expert)
            x = hidden[token]
            up = F.linear(x, self.up_proj[expert])
            inner = self.act(up) if self.gate_proj is None else self.act(F.linear(x, self.gate_proj[expert])) * up
            inner = self.sites.expert_down_in(inner[None])[0]
            # each token once per expert: an indexed add (index_add_ stalls for tens of ms on a busy CPU)
            out[token] += F.linear(inner, self.down_proj[expert]) * weights[token, slot, None]
        return out

    def as_list(self, config: MoEConfig) -> "ExpertList":
        """The same experts as one `MLP` each, their weights copied."""
        experts = ExpertList(config)
        with torch.no_grad():
            for index, expert in enumerate(experts):
                if self.gate_proj is not None:
                    expert.gate_proj.weight = nn.Parameter(self.gate_proj[index].clone())
                expert.up_proj.weight = nn.Parameter(self.up_proj[index].clone())
                expert.down_proj.weight = nn.Parameter(self.down_proj[index].clone())
        return experts


class ExpertList(nn.ModuleList):
    """The experts as one `MLP` each (`Experts.as_list`), called as `Experts` is. With `route_all` (set while a
    quantization walk gathers statistics) every token passes through every expert, as GPTQModel calibrates, so no
    expert is left without statistics; each token's output is still that of its own experts only."""

    def __init__(self, config: MoEConfig):
        expert = MLPConfig(d_model=config.expert_width, d_ff=config.d_ff, gated=config.gated,
                           activation=config.activation)
        super().__init__([MLP(expert) for _ in range(config.n_experts)])
        self.top_k, self.route_all = config.top_k, False
        self.routed = None  # a tensor to count the tokens routed to each expert in, while set

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if self.routed is not None and not self.route_all:
            self.routed += torch.bincount(experts.flatten(), minlength=len(self)).cpu()
        out = torch.zeros_like(hidden)
        chosen = range(len(self)) if self.route_all else experts.unique().tolist()
        for expert in chosen:
            token, slot = torch.where(experts == expert)
            if self.route_all:
                y = self[expert](hidden[None])[0][token]
            else:
                y = self[expert](hidden[token][None])[0]
            out[token] += y * weights[token, slot, None]
        return out

    def input_layers(self) -> list[nn.Module]:
        return [layer for expert in self for layer in expert.input_layers()]

    def output_layers(self) -> list[nn.Linear]:
        return [layer for expert in self for layer in expert.output_layers()]


class MoE(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        c = config
        self.config = c
        self.router = Router(c)
        latent = c.latent_size > 0
        self.fc1_latent_proj = nn.Linear(c.d_model, c.latent_size, bias=c.bias) if latent else None
        self.experts = Experts(c)
        self.fc2_latent_proj = nn.Linear(c.latent_size, c.d_model, bias=c.bias) if latent else None
        shared = c.shared_expert()
        self.shared_expert = MLP(shared) if shared is not None else None
        latent_sites = ("fc1_latent_in", "fc2_latent_in") if latent else ()
        self.sites = make_sites("router_in", "expert_in", *latent_sites, table="moe")

    forward_order = ("sites.router_in", "router", "sites.fc1_latent_in", "fc1_latent_proj", "sites.expert_in",
                     "experts", "sites.fc2_latent_in", "fc2_latent_proj", "shared_expert")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D) -> the routed experts' weighted sum, plus the shared expert's output (B, L, D)."""
        sites = self.sites
        batch, length, width = hidden.shape
        weights, experts = self.router(sites.router_in(hidden).reshape(-1, width))
        routed = hidden
        if self.fc1_latent_proj is not None:
            routed = self.fc1_latent_proj(sites.fc1_latent_in(hidden))
        routed = sites.expert_in(routed)
        out = self.experts(routed.reshape(batch * length, -1), weights, experts).view(batch, length, -1)
        if self.fc2_latent_proj is not None:
            out = self.fc2_latent_proj(sites.fc2_latent_in(out))
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden)
        return out

    def mlps(self) -> list[MLP]:
        """Every expert (as an `ExpertList`) and the shared expert."""
        return list(self.experts) + ([self.shared_expert] if self.shared_expert is not None else [])

    def input_layers(self) -> list[nn.Module]:
        """The layers reading the MoE's input: the router, the latent projection or the experts, the shared expert
        (see `Block.input_layers`; the experts as an `ExpertList`)."""
        reading = [self.fc1_latent_proj] if self.fc1_latent_proj is not None else self.experts.input_layers()
        return [self.router] + reading + (self.shared_expert.input_layers() if self.shared_expert else [])

    def output_layers(self) -> list[nn.Linear]:
        writing = [self.fc2_latent_proj] if self.fc2_latent_proj is not None else self.experts.output_layers()
        return writing + (self.shared_expert.output_layers() if self.shared_expert else [])


def experts_as_lists(model: nn.Module) -> None:
    """Every mixture of experts' experts as one MLP each (`Experts.as_list`), their sites named: linears that
    quantization handles like any other (a quantized hybrid holds its experts so)."""
    for module in list(model.modules()):
        if isinstance(module, MoE) and isinstance(module.experts, Experts):
            module.experts = module.experts.as_list(module.config)
    name_sites(model)


def expert_list_weights(module: nn.Module, weights: dict) -> dict:
    """{name: (source, tensor)} for `module` as a state dict of the full-precision layout names it, with each
    stacked expert tensor ("...experts.up_proj") given to the `ExpertList` that `module` holds in its place
    ("...experts.E.up_proj.weight" for every expert E)."""
    lists = {name for name, child in module.named_modules() if isinstance(child, ExpertList)}
    mapped = {}
    for name, (source, tensor) in weights.items():
        owner, _, part = name.rpartition(".")
        if owner not in lists:
            mapped[name] = (source, tensor)
            continue
        for index in range(tensor.shape[0]):
            mapped[f"{owner}.{index}.{part}.weight"] = (f"{source}[{index}]", tensor[index])
    return mapped
