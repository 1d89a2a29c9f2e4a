"""Config dataclasses of the layers beside Mamba in hybrid models: attention, MLP and mixture of experts. Like the
block configs they serialise to and from plain JSON dicts (`BlockConfig`); unlike them, a bad value raises
`InputError` on construction too, with one line naming the field."""

import dataclasses
from dataclasses import dataclass

from ..errors import InputError
from ..schema import boolean, integer, number, string, validate
from .config import BlockConfig, Mamba2Config, MambaConfig

SIZE = 65536
ACTIVATIONS = ("silu", "gelu", "relu2")
CHOICES = {"activation": ACTIVATIONS, "scoring": ("softmax", "sigmoid")}
# field -> (lowest, highest); 0 where allowed means "derived from the other fields" (see each config)
LIMITS = {
    "d_model": (1, SIZE),
    "input_size": (0, 2 * SIZE),
    "n_heads": (1, 4096),
    "n_kv_heads": (0, 4096),
    "head_dim": (0, SIZE),
    "rope_theta": (0.0, 1e15),
    "rotary_fraction": (0.0, 1.0),
    "scale": (0.0, 1e4),
    "key_multiplier": (0.0, 1e6),
    "adapter_rank": (0, SIZE),
    "d_ff": (1, 16 * SIZE),
    "gate_multiplier": (0.0, 1e6),
    "down_multiplier": (0.0, 1e6),
    "n_experts": (1, 4096),
    "top_k": (1, 4096),
    "n_group": (1, 4096),
    "topk_group": (1, 4096),
    "routed_scaling_factor": (0.0, 1e6),
    "shared_d_ff": (0, 16 * SIZE),
    "latent_size": (0, SIZE),
}
POSITIVE = {"rope_theta", "rotary_fraction", "key_multiplier", "gate_multiplier", "down_multiplier",
            "routed_scaling_factor"}


class LayerConfig(BlockConfig):
    """A hybrid layer's config: every field checked on construction (InputError naming the field), as `from_dict`
    checks a JSON dict."""

    LIMITS, POSITIVE, CHOICES = LIMITS, POSITIVE, CHOICES

    def __post_init__(self):
        where = type(self).__name__
        self.check_consistency(validate(self.to_dict(), self.schema(), where), where)


@dataclass
class AttentionConfig(LayerConfig):
    """Grouped-query causal self-attention: n_heads query heads share n_kv_heads key/value heads (n_heads /
    n_kv_heads queries per key/value head), each head_dim wide. RoPE (rotate-half convention) on the first
    rotary_fraction of each head's channels, or none."""

    d_model: int = 768  # o_proj output
    n_heads: int = 12
    n_kv_heads: int = 0  # 0: n_heads
    head_dim: int = 0  # 0: input_size // n_heads
    input_size: int = 0  # q/k/v input; 0: d_model (Zamba2's shared block reads 2 x d_model)
    rope: bool = True
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # Bamba rotates half of each head
    qkv_bias: bool = False
    o_bias: bool = False
    scale: float = 0.0  # the factor of q k^T; 0: 1/sqrt(head_dim) (Granite: attention_multiplier)
    key_multiplier: float = 1.0  # k = k_proj(x) * key_multiplier (Falcon-H1)
    adapter_rank: int = 0  # > 0: a low-rank adapter added to each of q_proj, k_proj, v_proj (Zamba2)

    def __post_init__(self):
        super().__post_init__()
        self.input_size = self.input_size or self.d_model
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.input_size // self.n_heads
        self.scale = self.scale or self.head_dim**-0.5

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates: the first ones (transformers' int(head_dim x fraction))."""
        return int(self.head_dim * self.rotary_fraction) if self.rope else 0

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        heads, kv_heads = values["n_heads"], values["n_kv_heads"] or values["n_heads"]
        if heads % kv_heads:
            raise InputError(f"{where}: n_heads {heads} is not a multiple of n_kv_heads {kv_heads}; expected a "
                             f"divisor of n_heads")
        head_dim = values["head_dim"] or (values["input_size"] or values["d_model"]) // heads
        if not head_dim:
            raise InputError(f"{where}: head_dim is 0 and the input is narrower than n_heads {heads}; expected "
                             f"head_dim >= 1")
        rotary = int(head_dim * values["rotary_fraction"])
        if values["rope"] and (rotary < 2 or rotary % 2):
            raise InputError(f"{where}: rotary_fraction {values['rotary_fraction']} of head_dim {head_dim} rotates "
                             f"{rotary} channels; expected an even number >= 2")


@dataclass
class MLPConfig(LayerConfig):
    """A feed-forward layer: gated, down(act(gate(x) * gate_multiplier) * up(x)) * down_multiplier (SwiGLU with
    silu), or not gated, down(act(up(x))) * down_multiplier (Nemotron-H: relu2)."""

    d_model: int = 768
    d_ff: int = 3072
    gated: bool = True
    activation: str = "silu"  # "silu", "gelu" (exact, erf), "relu2" (relu(x)^2)
    bias: bool = False  # on gate_proj, up_proj and down_proj
    gate_multiplier: float = 1.0  # Falcon-H1 mlp_multipliers[0]
    down_multiplier: float = 1.0  # Falcon-H1 mlp_multipliers[1]
    adapter_rank: int = 0  # > 0: a low-rank adapter added to [gate | up] (Zamba2)

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        if values["adapter_rank"] and not values["gated"]:
            raise InputError(f"{where}: adapter_rank {values['adapter_rank']} adapts a gated MLP's gate and up "
                             f"projections; expected gated true or adapter_rank 0")


@dataclass
class MoEConfig(LayerConfig):
    """Top-k mixture of experts, each an MLP (gated or not, as MLPConfig) d_ff wide, experts' weights stacked
    (n_experts, out, in). Routing, from the router's float logits:
    - "softmax": the top_k logits' softmax (norm_topk_prob: GraniteMoeHybrid), or the top_k of the softmax over all
      experts, not renormalised (Jamba);
    - "sigmoid" (Nemotron-H): scores = sigmoid(logits); the choice among scores + score_correction_bias, within
      the topk_group of n_group groups whose two best corrected scores sum highest; weights = the chosen scores,
      divided by their sum if norm_topk_prob.
    Weights are then multiplied by routed_scaling_factor. A shared expert (shared_d_ff wide) sees every token."""

    d_model: int = 768
    d_ff: int = 3072
    n_experts: int = 8
    top_k: int = 2
    scoring: str = "softmax"
    norm_topk_prob: bool = True
    score_correction: bool = False  # sigmoid only: a score_correction_bias buffer (e_score_correction_bias)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    gated: bool = True
    activation: str = "silu"
    shared_d_ff: int = 0  # 0: no shared expert
    latent_size: int = 0  # > 0: experts work in a latent space, fc1_latent_proj -> experts -> fc2_latent_proj
    bias: bool = False  # on the shared expert's and the latent projections' linears (never on routed experts)

    @property
    def expert_width(self) -> int:
        """The experts' input and output width: latent_size or d_model."""
        return self.latent_size or self.d_model

    def shared_expert(self) -> MLPConfig | None:
        if not self.shared_d_ff:
            return None
        return MLPConfig(d_model=self.d_model, d_ff=self.shared_d_ff, gated=self.gated, activation=self.activation,
                         bias=self.bias)

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        experts, groups, top_k = values["n_experts"], values["n_group"], values["top_k"]
        if top_k > experts:
            raise InputError(f"{where}: top_k {top_k} is above n_experts {experts}; expected at most n_experts")
        if values["scoring"] == "softmax" and (groups > 1 or values["score_correction"]):
            raise InputError(f"{where}: softmax routing has no expert groups or score correction; expected n_group "
                             f"1 and score_correction false, or scoring 'sigmoid'")
        if experts % groups:
            raise InputError(f"{where}: n_experts {experts} do not split into n_group {groups} groups; expected "
                             f"n_group to divide n_experts")
        if values["topk_group"] > groups:
            raise InputError(f"{where}: topk_group {values['topk_group']} is above n_group {groups}; expected at "
                             f"most n_group")
        per_group = experts // groups
        if groups > 1 and per_group < 2:
            raise InputError(f"{where}: a group's score is the sum of its two best experts, but n_group {groups} "
                             f"leaves {per_group} expert per group; expected at least 2")
        if top_k > values["topk_group"] * per_group:
            raise InputError(f"{where}: top_k {top_k} is above the {values['topk_group'] * per_group} experts of "
                             f"the topk_group {values['topk_group']} groups chosen; expected at most that")


BLOCK_KINDS = ("mamba1", "mamba2", "attention", "parallel", "zamba_hybrid", "mlp", "moe")
# kinds built of others: Falcon-H1's Mamba-2 beside attention; Zamba2's hybrid layer, a shared attention and MLP
# block feeding a Mamba-2 mixer
PARTS = {"parallel": ("mamba2", "attention"), "zamba_hybrid": ("mamba2", "attention", "mlp")}
LAYER_CONFIGS = {"mamba1": MambaConfig, "mamba2": Mamba2Config, "attention": AttentionConfig, "mlp": MLPConfig,
                 "moe": MoEConfig}
LM_LIMITS = {"vocab_size": (1, 2**24), "d_model": (1, SIZE), "norm_eps": (0.0, 1.0), "embedding_multiplier": (0.0, 1e6),
             "residual_multiplier": (0.0, 1e6), "logits_divisor": (0.0, 1e6), "shared_blocks": (1, 1024)}


@dataclass
class HybridLMConfig:
    """A causal language model whose blocks follow a pattern: `blocks` names each block's kind in order (a Mamba-1
    or Mamba-2 mixer, attention, both side by side ("parallel", Falcon-H1), Zamba2's hybrid layer ("zamba_hybrid",
    runtime.zamba), an MLP or a mixture of experts), every block a pre-norm residual block with an RMSNorm. A
    model whose layers have two sublayers (Granite-4.0-H, Bamba: a mixer, then a feed-forward layer) lists both.
    Each kind present takes its config; their d_model is the model's. Granite's multipliers: the embedding output
    times `embedding_multiplier`, each block's output times `residual_multiplier` before it joins the residual
    stream, the logits divided by `logits_divisor`. Zamba2's hybrid blocks share `shared_blocks` sets of attention
    and MLP weights in turn (`shared_owners`)."""

    vocab_size: int
    d_model: int
    blocks: list
    mamba1: MambaConfig | None = None
    mamba2: Mamba2Config | None = None
    attention: AttentionConfig | None = None
    mlp: MLPConfig | None = None
    moe: MoEConfig | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    shared_blocks: int = 1  # Zamba2's num_mem_blocks

    norm = "rms"  # not fields: every block norm and the final norm are RMSNorms

    def __post_init__(self):
        where = "HybridLMConfig"
        for i, kind in enumerate(self.blocks):
            if kind not in BLOCK_KINDS:
                raise InputError(f"{where}: blocks[{i}] is {kind!r}; expected one of {', '.join(BLOCK_KINDS)}")
        for kind in dict.fromkeys(part for block in self.blocks for part in PARTS.get(block, (block,))):
            config = getattr(self, kind)
            if not isinstance(config, LAYER_CONFIGS[kind]):
                raise InputError(f"{where}: blocks has {kind} blocks and {kind} is {type(config).__name__}; expected "
                                 f"a {LAYER_CONFIGS[kind].__name__}")
            if config.d_model != self.d_model:
                raise InputError(f"{where}: {kind}.d_model is {config.d_model}, the model's d_model {self.d_model}; "
                                 "expected the same width")
        if not self.blocks:
            raise InputError(f"{where}: blocks is empty; expected at least one block kind")
        if isinstance(self.shared_blocks, bool) or not isinstance(self.shared_blocks, int) or self.shared_blocks < 1:
            raise InputError(f"{where}: shared_blocks is {self.shared_blocks!r}; expected a positive integer")

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    def shared_owners(self) -> list[tuple[int, int]]:
        """Zamba2's hybrid blocks in order, each as (its index in `blocks`, the index of the block holding the
        weights it shares): hybrid block number i uses shared weights i % shared_blocks, held by the first hybrid
        block to use them."""
        hybrid = [i for i, kind in enumerate(self.blocks) if kind == "zamba_hybrid"]
        return [(index, hybrid[number % self.shared_blocks]) for number, index in enumerate(hybrid)]

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        layers = {kind: values.pop(kind) for kind in LAYER_CONFIGS}
        return {**values, **{kind: config.to_dict() for kind, config in layers.items() if config is not None}}

    @classmethod
    def from_dict(cls, values: dict, *, where: str = "hybrid-lm config") -> "HybridLMConfig":
        """A config from its JSON dict, every field checked (one line starting with `where` otherwise)."""
        from ..schema import list_of, obj

        schema = {
            "vocab_size": integer(*LM_LIMITS["vocab_size"]),
            "d_model": integer(*LM_LIMITS["d_model"]),
            "blocks": list_of(string(*BLOCK_KINDS), min_items=1),
            "norm_eps": number(*LM_LIMITS["norm_eps"], default=1e-5, above=True),
            "tie_embeddings": boolean(False),
            "shared_blocks": integer(*LM_LIMITS["shared_blocks"], default=1),
            **{name: number(*LM_LIMITS[name], default=1.0, above=True)
               for name in ("embedding_multiplier", "residual_multiplier", "logits_divisor")},
            **{kind: obj(default=None) for kind in LAYER_CONFIGS},
        }
        checked = validate(values, schema, where)
        layers = {kind: None if checked[kind] is None else
                  LAYER_CONFIGS[kind].from_dict(checked[kind], where=f"{where} {kind}") for kind in LAYER_CONFIGS}
        return cls(**{**checked, **layers})
