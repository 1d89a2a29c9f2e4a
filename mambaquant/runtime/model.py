"""A Mamba model composed from parts (`ModelConfig`): stem -> class token -> position embedding -> Mamba-1 blocks
-> final norm -> pooling -> head. Vision Mamba and the per-token tagger are two of its presets; parameter names
follow the Vim state dict (`patch_embed.proj`, `cls_token`, `pos_embed`, `head`)."""

import math

import torch
from torch import nn

from ..errors import InputError
from .block import MambaBlock, make_norm
from .config import ModelConfig, TaggerConfig, VisionConfig
from .sites import make_sites, name_sites

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


class PatchEmbed(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.d_model, config.patch_size, stride=config.stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, patches, D), row-major over the grid


class MLPHead(nn.Module):
    """fc1 -> activation -> fc2, both quantized as linears; the hidden activation is a site."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.head_hidden)
        self.act = ACTIVATIONS[config.head_act]()
        self.fc2 = nn.Linear(config.head_hidden, config.num_classes)
        self.sites = make_sites("hidden")

    forward_order = ("fc1", "act", "sites.hidden", "fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.sites.hidden(self.act(self.fc1(x))))


class MambaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.sites = make_sites("embed", "norm_f", "logits")
        if c.stem == "embedding":
            self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        elif c.stem == "patch":
            self.patch_embed = PatchEmbed(c)
        else:
            self.input_proj = nn.Linear(c.in_features, c.d_model)
        if c.cls_token != "none":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model))
        if c.pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, c.positions, c.d_model))
        self.layers = nn.ModuleList(MambaBlock(c) for _ in range(c.n_layer))
        self.norm_f = make_norm(c, c.final_norm_kind)
        self.head = nn.Linear(c.d_model, c.num_classes) if c.head == "linear" else MLPHead(c)
        name_sites(self)

    forward_order = ("sites.embed", "layers", "norm_f", "sites.norm_f", "head", "sites.logits")

    @property
    def fixed_positions(self) -> int | None:
        """The sequence length through the blocks where every input has the same one (per-position activation
        ranges need it), else None."""
        return self.config.positions or None

    def cls_position(self, length: int) -> int:
        """Where the class token sits in a sequence of `length` stem tokens."""
        return {"start": 0, "middle": length // 2, "end": length}[self.config.cls_token]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs -> logits (B, classes), or (B, L, classes) without pooling."""
        hidden = self.embed(inputs)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.output(hidden)

    def check_input(self, inputs) -> None:
        """One line naming what does not fit this model's stem (dtype, shape, token range)."""
        c = self.config
        if not isinstance(inputs, torch.Tensor):
            raise InputError(f"expected a tensor of inputs, got a {type(inputs).__name__}")
        if c.stem == "embedding":
            if inputs.dtype not in TOKEN_DTYPES or inputs.dim() != 2:
                raise InputError(f"expected an integer tensor of token ids of shape (N, L); got {inputs.dtype} "
                                 f"{tuple(inputs.shape)}")
            if inputs.numel() and (inputs.min() < 0 or inputs.max() >= c.vocab_size):
                raise InputError(f"token ids outside 0..{c.vocab_size - 1}, the model's vocabulary")
        else:
            if not inputs.is_floating_point():
                raise InputError(f"expected a float tensor of inputs, got {inputs.dtype}")
            expected = {"patch": (c.in_chans, c.img_size, c.img_size), "linear": (c.in_features,)}.get(c.stem)
            if c.stem == "flatten" and (inputs.dim() < 2 or math.prod(inputs.shape[1:]) != c.in_features):
                raise InputError(f"inputs of shape {tuple(inputs.shape)} do not flatten to {c.in_features} features "
                                 f"per sample")
            if c.stem == "patch" and tuple(inputs.shape[1:]) != expected:
                raise InputError(f"images of shape {tuple(inputs.shape[1:])} do not fit this model: expected "
                                 f"{expected}")
            if c.stem == "linear" and (inputs.dim() != 3 or inputs.shape[2] != c.in_features):
                raise InputError(f"expected a time series of shape (N, L, {c.in_features}); got "
                                 f"{tuple(inputs.shape)}")
        if c.stem in ("embedding", "linear") and c.seq_len and inputs.shape[1] != c.seq_len:
            raise InputError(f"inputs of length {inputs.shape[1]}; this model takes sequences of exactly {c.seq_len}")

    def stem(self, inputs: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.stem == "embedding":
            return self.embedding(inputs)
        if c.stem == "patch":
            return self.patch_embed(inputs)
        if c.stem == "flatten":
            return self.input_proj(inputs.flatten(1)[:, None])
        return self.input_proj(inputs)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """The stem's tokens, with the class token inserted and the position embedding added: (B, L', D)."""
        self.check_input(inputs)
        tokens = self.stem(inputs)
        if self.config.cls_token != "none":
            at = self.cls_position(tokens.shape[1])
            cls = self.cls_token.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :at], cls, tokens[:, at:]], dim=1)
        if self.config.pos_embed:
            tokens = tokens + self.pos_embed
        return self.sites.embed(tokens)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, 1, D): the head reads one token's worth, laid out as a sequence of one like every site
        tensor; unchanged without pooling."""
        pooling = self.config.pooling
        if pooling == "cls":
            at = self.cls_position(hidden.shape[1] - 1)
            return hidden[:, at : at + 1]
        if pooling == "mean":
            return hidden.mean(1, keepdim=True)
        if pooling == "max":
            return hidden.amax(1, keepdim=True)
        if pooling == "last":
            return hidden[:, -1:]
        return hidden

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.pool(self.sites.norm_f(self.norm_f(hidden))))
        return self.sites.logits(logits if self.config.pooling == "none" else logits[:, 0])


class VisionMamba(MambaModel):
    """Vision Mamba (Vim, hustvl/Vim `models_mamba.py`): patches -> middle class token -> position embedding ->
    bidirectional Mamba blocks -> final norm -> head on the class token."""

    def __init__(self, config: VisionConfig):
        super().__init__(config)


class MambaTagger(MambaModel):
    """A per-token classifier (e.g. typeseg's per-byte content-type model): embedding -> Mamba blocks -> final norm
    -> head giving one label per token."""

    def __init__(self, config: TaggerConfig):
        super().__init__(config)
