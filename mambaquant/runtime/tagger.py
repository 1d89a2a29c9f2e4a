"""A per-token classifier (e.g. typeseg's per-byte content-type model): embedding -> Mamba blocks -> final norm ->
head giving one label per token."""

import torch
from torch import nn

from .block import MambaBlock, make_norm
from .config import TaggerConfig
from .sites import make_sites, name_sites


class MambaTagger(nn.Module):
    def __init__(self, config: TaggerConfig):
        super().__init__()
        self.config = config
        self.sites = make_sites("embed", "norm_f", "logits")
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.head = nn.Linear(config.d_model, config.num_classes)
        name_sites(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> logits (B, L, classes)."""
        hidden = self.embed(tokens)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.output(hidden)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.sites.embed(self.embedding(tokens))

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.sites.logits(self.head(self.sites.norm_f(self.norm_f(hidden))))
