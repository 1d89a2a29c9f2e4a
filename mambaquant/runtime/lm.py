"""Causal language model of Mamba-1, Mamba-2 or hybrid blocks, with a state cache for generation."""

import math

import torch
from torch import nn

from ..errors import InputError
from .attention import Attention
from .block import Block, MambaBlock, make_norm
from .config import LMConfig, Mamba2LMConfig
from .conv import SSMState
from .hybrid_config import HybridLMConfig
from .mixer import MambaMixer
from .mixer2 import Mamba2Mixer
from .mlp import MLP
from .moe import MoE
from .parallel import ParallelMixer
from .sites import make_sites, name_sites
from .zamba import ZambaHybridBlock

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def make_blocks(config: LMConfig | Mamba2LMConfig | HybridLMConfig) -> list[nn.Module]:
    """A pure model's n_layer Mamba blocks, or a hybrid's blocks as its pattern lists them (Zamba2's hybrid blocks
    given the shared weights of the block they take their turn with)."""
    if not isinstance(config, HybridLMConfig):
        return [MambaBlock(config) for _ in range(config.n_layer)]
    mixers = {"mamba1": lambda: MambaMixer(config.mamba1), "mamba2": lambda: Mamba2Mixer(config.mamba2),
              "attention": lambda: Attention(config.attention),
              "parallel": lambda: ParallelMixer(Mamba2Mixer(config.mamba2), Attention(config.attention)),
              "mlp": lambda: MLP(config.mlp), "moe": lambda: MoE(config.moe)}
    blocks = [ZambaHybridBlock(config) if kind == "zamba_hybrid" else
              Block(make_norm(config), mixers[kind](), multiplier=config.residual_multiplier) for kind in config.blocks]
    for index, owner in config.shared_owners():
        if index != owner:
            blocks[index].shared.share_weights_of(blocks[owner].shared)
    return blocks


class MambaLM(nn.Module):
    """embedding -> blocks -> final norm -> head; the blocks Mamba-1, Mamba-2 or a hybrid's pattern of Mamba-2,
    attention, MLP and mixture-of-experts blocks. A block that `reads_embedding` (Zamba2's hybrid layer) is given the
    embedding output beside the hidden state."""

    def __init__(self, config: LMConfig | Mamba2LMConfig | HybridLMConfig):
        super().__init__()
        if isinstance(config, LMConfig) and (config.bidirectional != "none" or config.conv != "causal"):
            raise ValueError("a causal language model needs causal blocks (no bidirectional scan, causal conv)")
        self.config = config
        self.sites = make_sites("embed", "norm_f", "logits")
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(make_blocks(config))
        self.norm_f = make_norm(config)
        # Granite's muP multipliers, attributes a transform that folds them into weights may set to 1
        self.embedding_multiplier = getattr(config, "embedding_multiplier", 1.0)
        self.logits_divisor = getattr(config, "logits_divisor", 1.0)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        name_sites(self)

    forward_order = ("sites.embed", "layers", "norm_f", "sites.norm_f", "lm_head", "sites.logits")

    def forward(self, input_ids: torch.Tensor, cache: list[SSMState] | None = None) -> torch.Tensor:
        """input_ids (B, L) -> logits (B, L, vocab). With a cache, continues from its state and updates it."""
        return self.output(self.hidden_states(input_ids, cache))

    def hidden_states(self, input_ids: torch.Tensor, cache: list[SSMState] | None = None) -> torch.Tensor:
        """The last block's output (B, L, d_model), before norm_f and the head: `output` of a selection of its
        positions gives their logits alone (each position's output depends on that position only)."""
        hidden = embedded = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            state = cache[i] if cache is not None else None
            hidden = layer(hidden, embedded, state) if layer.reads_embedding else layer(hidden, state)
        return hidden

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(input_ids)
        if self.embedding_multiplier != 1.0:
            embedded = embedded * self.embedding_multiplier
        return self.sites.embed(embedded)

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.sites.norm_f(self.norm_f(hidden)))
        if self.logits_divisor != 1.0:
            logits = logits / self.logits_divisor
        return self.sites.logits(logits)

    def new_cache(self, batch_size: int) -> list:
        """Each block's state for decoding: SSMState, KVCache, or None for a block that keeps none."""
        return [layer.new_state(batch_size) for layer in self.layers]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prefill the prompt in one pass, then decode one token per step from the recurrent state.
        temperature 0 is greedy. Returns the new tokens (B, max_new_tokens)."""
        check_generation(input_ids, max_new_tokens, temperature, top_k, self.config.vocab_size)
        cache = self.new_cache(input_ids.shape[0])
        logits = self(input_ids, cache)[:, -1]
        new_tokens = []
        for _ in range(max_new_tokens):
            token = sample(logits, temperature, top_k, generator)
            new_tokens.append(token)
            logits = self(token[:, None], cache)[:, -1]
        return torch.stack(new_tokens, dim=1)


def check_generation(input_ids, max_new_tokens, temperature, top_k, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in INDEX_DTYPES:
        raise InputError("the prompt must be an integer tensor of token ids of shape (batch, length)")
    if input_ids.numel() == 0:
        raise InputError("the prompt is empty; expected at least one token")
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise InputError(f"the prompt holds token ids outside 0..{vocab_size - 1}, the model's vocabulary")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise InputError(f"temperature must be a finite number > 0, or 0 for greedy decoding; got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}")


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    """The next token of each row: the argmax at temperature 0, else drawn from softmax(logits / temperature) over
    the top_k largest logits. A temperature so small that logits / temperature overflows float32 (or rounds to 0 in
    it: below about 1e-45) is greedy decoding too: every logit below the largest has probability 0 long before."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if not scaled.isfinite().all() and logits.isfinite().all():
        return logits.argmax(-1)
    logits = scaled
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
