"""Grouped-query causal self-attention, the attention layers of the hybrid models (Granite-4.0-H, Nemotron-H, Bamba,
Falcon-H1, Jamba, Zamba2): q/k/v projections, RoPE or none, softmax(q k^T * scale + causal mask) v in float32,
o_proj; a KV cache for decoding. Every quantizable tensor passes a site; q/k/v's input is the block norm output,
the block's `norm` site."""

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import LowRankAdapter
from .hybrid_config import AttentionConfig
from .sites import make_sites


@dataclass
class KVCache:
    """The keys and values of every position an attention layer has seen, as its `k` and `v` sites gave them
    (B, T, n_kv_heads x head_dim); each call appends its positions, which continue from `length`."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[1]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotary_tables(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (L, rotary_dim) at `positions` (L,): channel i and channel i + rotary_dim/2 turn together at the
    frequency theta^(-2i / rotary_dim) (transformers' default RoPE, computed as it does in float32)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float, device=positions.device) / rotary_dim
    angles = positions.float()[:, None] * (1.0 / (theta**exponents))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] channels of each head of x (B, L, heads, head_dim); the rest pass."""
    rotary = cos.shape[-1]
    turned, passed = x[..., :rotary], x[..., rotary:]
    return torch.cat([turned * cos + rotate_half(turned) * sin, passed], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: AttentionConfig):
        super().__init__()
        c = config
        self.config = c
        self.q_proj = nn.Linear(c.input_size, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.input_size, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.input_size, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        adapters = c.adapter_rank > 0
        self.q_adapter = LowRankAdapter(c.input_size, c.adapter_rank, c.n_heads * c.head_dim) if adapters else None
        self.k_adapter = LowRankAdapter(c.input_size, c.adapter_rank, c.n_kv_heads * c.head_dim) if adapters else None
        self.v_adapter = LowRankAdapter(c.input_size, c.adapter_rank, c.n_kv_heads * c.head_dim) if adapters else None
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=c.o_bias)
        self.sites = make_sites("q", "k", "v", "o_proj_in", table="attention")

    forward_order = ("q_proj", "k_proj", "v_proj", "q_adapter", "k_adapter", "v_adapter", "sites.q", "sites.k",
                     "sites.v", "sites.o_proj_in", "o_proj")

    def new_state(self, batch_size: int) -> KVCache:
        like = next(itertools.chain(self.parameters(), self.buffers()))  # a quantized linear has only buffers
        empty = like.new_zeros(batch_size, 0, self.config.n_kv_heads * self.config.head_dim, dtype=torch.float32)
        return KVCache(k=empty, v=empty.clone())

    def forward(self, hidden: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """hidden (B, L, input_size) -> (B, L, d_model). With a cache, the positions continue after the cached ones,
        which every query also sees, and the cache takes this call's keys and values."""
        c, sites = self.config, self.sites
        batch, length = hidden.shape[:2]
        q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        if self.q_adapter is not None:
            q, k, v = q + self.q_adapter(hidden), k + self.k_adapter(hidden), v + self.v_adapter(hidden)
        k = k * c.key_multiplier
        past = cache.length if cache is not None else 0
        if c.rope:
            positions = torch.arange(past, past + length, device=hidden.device)
            cos, sin = (table[:, None] for table in rotary_tables(positions, c.rotary_dim, c.rope_theta))
            q = apply_rope(q.view(batch, length, c.n_heads, c.head_dim), cos, sin).flatten(2)
            k = apply_rope(k.view(batch, length, c.n_kv_heads, c.head_dim), cos, sin).flatten(2)
        q, k, v = sites.q(q), sites.k(k), sites.v(v)
        if cache is not None:
            cache.k = k = torch.cat([cache.k, k], dim=1)
            cache.v = v = torch.cat([cache.v, v], dim=1)
        return self.o_proj(sites.o_proj_in(self.attend(q, k, v, past)))

    def input_layers(self) -> list[nn.Module]:
        """The layers reading the attention's input (see `Block.input_layers`)."""
        adapters = [a.down for a in (self.q_adapter, self.k_adapter, self.v_adapter) if a is not None]
        return [self.q_proj, self.k_proj, self.v_proj] + adapters

    def output_layers(self) -> list[nn.Linear]:
        return [self.o_proj]

    def query_layers(self) -> list[nn.Linear]:
        """The linears writing the queries: q_proj, and the q adapter's second linear where there is one."""
        return [self.q_proj] + ([self.q_adapter.up] if self.q_adapter is not None else [])

    def key_layers(self) -> list[nn.Linear]:
        """The linears writing the keys: k_proj, and the k adapter's second linear where there is one."""
        return [self.k_proj] + ([self.k_adapter.up] if self.k_adapter is not None else [])

    def value_layers(self) -> list[nn.Linear]:
        """The linears writing the values: v_proj, and the v adapter's second linear where there is one."""
        return [self.v_proj] + ([self.v_adapter.up] if self.v_adapter is not None else [])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
        """softmax(q k^T * scale + causal mask) v in float32, query head h reading key/value head h // (n_heads /
        n_kv_heads): q (B, L, H*P), k and v (B, past + L, G*P) -> (B, L, H*P)."""
        c = self.config
        batch, length, total, dtype = q.shape[0], q.shape[1], k.shape[1], q.dtype
        q = q.float().reshape(batch, length, c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim)
        k = k.float().reshape(batch, total, c.n_kv_heads, c.head_dim)
        v = v.float().reshape(batch, total, c.n_kv_heads, c.head_dim)
        scores = torch.einsum("blgrp,btgp->bgrlt", q, k) * c.scale
        visible = torch.ones(length, total, dtype=torch.bool, device=q.device).tril(past)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        return torch.einsum("bgrlt,btgp->blgrp", weights, v).flatten(2).to(dtype)
