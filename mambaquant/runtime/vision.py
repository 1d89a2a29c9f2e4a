"""Vision Mamba (Vim, hustvl/Vim `models_mamba.py`): patches -> middle class token -> position embedding ->
bidirectional Mamba blocks -> final norm -> head on the class token. Parameter names follow the official state dict."""

import torch
from torch import nn

from ..errors import InputError
from .block import MambaBlock, make_norm
from .config import VisionConfig
from .sites import make_sites, name_sites


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.d_model, config.patch_size, stride=config.stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, patches, D), row-major over the grid


class VisionMamba(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.sites = make_sites("embed", "norm_f", "logits")
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.d_model))
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.head = nn.Linear(config.d_model, config.num_classes)
        name_sites(self)

    @property
    def cls_position(self) -> int:
        return self.config.num_patches // 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W), normalised -> logits (B, classes)."""
        hidden = self.embed(images)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.output(hidden)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patches with the class token inserted in the middle, plus the position embedding: (B, patches + 1, D)."""
        c = self.config
        if images.shape[1:] != (c.in_chans, c.img_size, c.img_size):
            raise InputError(
                f"images of shape {tuple(images.shape[1:])} do not fit this model: "
                f"expected ({c.in_chans}, {c.img_size}, {c.img_size})"
            )
        patches = self.patch_embed(images)
        mid = self.cls_position
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return self.sites.embed(torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1) + self.pos_embed)

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.sites.norm_f(self.norm_f(hidden))
        return self.sites.logits(self.head(hidden[:, self.cls_position]))
