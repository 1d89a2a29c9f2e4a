"""Zamba2's hybrid layer: a shared attention and MLP block reads the hidden state beside the embedding output, and
its output, through the layer's own `linear`, joins the input of a Mamba-2 mixer (not the residual stream):

    t = linear(mlp(ff_norm(attention(norm(cat[x, e])))))        out = x + mamba(mamba_norm(x + t))

Hybrid layers take turns among a few sets of shared weights (`HybridLMConfig.shared_owners`): their attention and
MLP projections and both norms are the same modules, each layer keeping its own adapters, sites and `linear`.
`unshare_blocks` gives each layer its own copy (what quantization needs: a rounding or a transform chosen at one
depth would be wrong at the others)."""

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from .attention import Attention, KVCache
from .block import RMSNorm, make_norm
from .conv import SSMState
from .hybrid_config import HybridLMConfig
from .mixer2 import Mamba2Mixer
from .mlp import MLP
from .sites import make_sites

SHARED = ("norm", "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "ff_norm",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # SharedTransformer's modules that layers share


@dataclass
class ZambaState:
    """A hybrid layer's decoding state: the shared block's KV cache and the Mamba-2 mixer's recurrent state."""

    kv: KVCache
    ssm: SSMState


class SharedTransformer(nn.Module):
    """mlp(ff_norm(attention(norm(cat[x, e])))): no residual connection inside; attention reads 2 x d_model."""

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.norm = RMSNorm(2 * config.d_model, config.norm_eps)
        self.attention = Attention(config.attention)
        self.ff_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config.mlp)
        self.sites = make_sites("joined", "attention_in", table="zamba")

    forward_order = ("sites.joined", "norm", "sites.attention_in", "attention", "ff_norm", "mlp")

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        joined = self.sites.joined(torch.cat([hidden, embedded], dim=-1))
        attended = self.attention(self.sites.attention_in(self.norm(joined)), cache)
        return self.mlp(self.ff_norm(attended))

    def share_weights_of(self, owner: "SharedTransformer") -> None:
        """Use `owner`'s projections and norms (the same modules, so the same parameters); adapters stay ours."""
        for path in SHARED:
            parent, _, name = path.rpartition(".")
            setattr(self.get_submodule(parent), name, owner.get_submodule(path))


class ZambaHybridBlock(nn.Module):
    reads_embedding = True  # MambaLM passes the embedding output beside the hidden state

    def __init__(self, config: HybridLMConfig):
        super().__init__()
        self.shared = SharedTransformer(config)
        self.linear = nn.Linear(config.d_model, config.d_model, bias=False)
        self.norm = make_norm(config)
        self.mixer = Mamba2Mixer(config.mamba2)
        self.sites = make_sites("residual", "linear_in", "norm", "out", table="zamba")

    forward_order = ("sites.residual", "shared", "sites.linear_in", "linear", "norm", "sites.norm", "mixer",
                     "sites.out")

    def input_layers(self) -> list[nn.Module]:
        """The layers reading the residual stream through the block norm (see `Block.input_layers`)."""
        return self.mixer.input_layers()

    def joined_input_layers(self) -> list[nn.Module]:
        """The layers reading [residual stream, embedding output] through the shared block's norm: both halves are
        in the residual stream's basis."""
        return self.shared.attention.input_layers()

    def output_layers(self) -> list[nn.Linear]:
        """The linears writing in the residual stream's basis: out_proj, and `linear`, whose output joins it before
        the block norm."""
        return self.mixer.output_layers() + [self.linear]

    def norm_readers(self) -> list[tuple[nn.Module, list[nn.Module], nn.Module]]:
        """The block norm (read by the mixer), the shared block's norm (by q/k/v and their adapters) and its
        ff_norm (by the MLP); see `Block.norm_readers`."""
        shared = self.shared
        return [(self.norm, self.input_layers(), self.sites["norm"]),
                (shared.norm, self.joined_input_layers(), shared.sites["attention_in"]),
                (shared.ff_norm, shared.mlp.input_layers(), shared.mlp.sites["mlp_in"])]

    def new_state(self, batch_size: int) -> ZambaState:
        return ZambaState(kv=self.shared.attention.new_state(batch_size), ssm=self.mixer.new_state(batch_size))

    def forward(self, residual: torch.Tensor, embedded: torch.Tensor, state: ZambaState | None = None) -> torch.Tensor:
        residual = self.sites.residual(residual)
        shared = self.shared(residual, embedded, None if state is None else state.kv)
        transformed = self.linear(self.sites.linear_in(shared))
        normed = self.sites.norm(self.norm(residual + transformed))
        return residual + self.sites.out(self.mixer(normed) if state is None else self.mixer(normed, state.ssm))


def unshare_blocks(model: nn.Module) -> int:
    """Give each of a Zamba2 model's hybrid layers its own copy of the attention and MLP weights it shares (the
    model's function is unchanged; its config then says one set per hybrid layer). Returns the parameters added."""
    config = model.config
    if not isinstance(config, HybridLMConfig):
        return 0
    uses = config.shared_owners()
    added = 0
    for index, owner in uses:
        if index != owner:
            shared = model.layers[index].shared
            for path in SHARED:
                parent, _, name = path.rpartition(".")
                module = copy.deepcopy(shared.get_submodule(path))
                setattr(shared.get_submodule(parent), name, module)
                added += sum(p.numel() for p in module.parameters())
    if added:
        model.config = replace(config, shared_blocks=len(uses))
    return added
