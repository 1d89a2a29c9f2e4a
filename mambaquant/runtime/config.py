"""Small config dataclasses for the Mamba runtime (Mamba-1 and Mamba-2 blocks); they serialise to and from plain
JSON dicts."""

import dataclasses
import math
from dataclasses import dataclass

NORMS = ("rms", "layer", "none")
CONVS = ("causal", "same")
BIDIRECTIONAL = ("none", "separate", "shared-conv", "shared")
STEMS = ("embedding", "patch", "flatten", "linear")
CLS_TOKENS = ("none", "start", "middle", "end")
POOLINGS = ("none", "cls", "mean", "max", "last")
HEADS = ("linear", "mlp")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh")
FINAL_NORMS = ("same", "rms", "layer", "none", "centered")
GATED_NORMS = ("after_gate", "before_gate", "none")
CHOICES = {"norm": NORMS, "conv": CONVS, "bidirectional": BIDIRECTIONAL, "stem": STEMS, "cls_token": CLS_TOKENS,
           "pooling": POOLINGS, "head": HEADS, "head_act": ACTIVATIONS, "final_norm": FINAL_NORMS,
           "gated_norm": GATED_NORMS}
# field -> (lowest, highest) accepted by `from_dict`: sizes are bounded so that no config asks for an absurd
# allocation or divides by zero (a larger model still has to fit the memory check before it is built)
LIMITS = {
    "d_model": (1, 65536),
    "n_layer": (1, 1024),
    "d_state": (1, 1024),
    "expand": (1, 16),
    "d_conv": (1, 64),
    "dt_rank": (0, 65536),  # 0: ceil(d_model / 16)
    "dt_offset": (0.0, 1.0),
    "norm_eps": (0.0, 1.0),  # excluded: 0
    "mixer_rms_eps": (0.0, 1.0),  # 0: no inner norms
    "vocab_size": (1, 2**24),
    "num_classes": (1, 2**20),
    "img_size": (1, 8192),
    "patch_size": (1, 1024),
    "stride": (1, 1024),
    "in_chans": (1, 64),
    "in_features": (1, 2**24),
    "seq_len": (0, 2**24),  # 0: any length
    "head_hidden": (0, 65536),  # 0: d_model
    "head_dim": (1, 65536),
    "n_groups": (1, 65536),
    "d_ssm": (0, 16 * 65536),  # 0: d_inner
    "inner_size": (0, 16 * 65536),  # 0: expand x d_model
    "chunk_size": (1, 65536),
    "dt_limit_min": (0.0, 1e9),
    "dt_limit_max": (0.0, 1e9),  # 0: no upper limit
}
POSITIVE = {"norm_eps"}  # the lower bound itself is excluded


class BlockConfig:
    """What every block config shares: JSON round trip with every field checked, against the class's `LIMITS`,
    `POSITIVE` and `CHOICES` (module-level ones by default)."""

    LIMITS, POSITIVE, CHOICES = LIMITS, POSITIVE, CHOICES

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, where: str = "model config"):
        """A config from its JSON dict, every field checked (JSON type, range, allowed values; `InputError` with one
        line starting with `where` otherwise). Missing fields take their defaults; unknown keys are ignored."""
        from ..schema import validate

        checked = validate(values, cls.schema(), where)
        cls.check_consistency(checked, where)
        return cls(**checked)

    @classmethod
    def schema(cls, limits: dict | None = None) -> dict:
        """The `mambaquant.schema` schema of this dataclass: one field per dataclass field, from its type, `limits`
        (default: the class's `LIMITS`; a bound of None: no bound), `POSITIVE` and `CHOICES`."""
        from ..schema import boolean, integer, number, string

        limits = cls.LIMITS if limits is None else limits
        schema = {}
        for f in dataclasses.fields(cls):
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if f.name in cls.CHOICES:
                schema[f.name] = string(*cls.CHOICES[f.name], default=f.default)
            elif kind == "bool":
                schema[f.name] = boolean(f.default)
            elif kind == "int":
                schema[f.name] = integer(*limits[f.name], default=f.default)
            elif kind == "float":
                schema[f.name] = number(*limits[f.name], default=f.default, above=f.name in cls.POSITIVE)
            else:
                raise TypeError(f"{cls.__name__}.{f.name}: no schema for type {kind}")
        return schema

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        """Constraints between fields, after each field is checked on its own."""



    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


@dataclass
class MambaConfig(BlockConfig):
    """One stack of Mamba-1 blocks (the backbone shared by the language and vision models)."""

    d_model: int = 768
    n_layer: int = 24
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int = 0  # 0 means ceil(d_model / 16), the Mamba default
    conv_bias: bool = True
    bias: bool = False  # bias on in_proj and out_proj
    x_proj_bias: bool = False
    conv: str = "causal"  # "causal" (Mamba) or "same" (centred, non-causal)
    dt_offset: float = 0.0  # added after the softplus: dt = softplus(dt_proj(.)) + dt_offset
    norm: str = "rms"  # the block norm: "rms" (Mamba, Vim), "layer" (LayerNorm with bias) or "none"
    norm_eps: float = 1e-5
    # "none"; "separate": a second SSM branch (own conv, x_proj, dt_proj, A, D) on the reversed sequence (Vim v2);
    # "shared-conv": one conv for both directions, a second SSM (own x_proj, dt_proj, A, D) scanning its output
    # backwards; "shared": the same SSM inputs also scanned backwards in time with the same parameters
    bidirectional: str = "none"
    divide_out: bool = True  # bidirectional only: average the two directions instead of adding them
    residual: bool = True  # block output = input + mixer(norm(input)); False: mixer(norm(input))
    mixer_rms_eps: float = 0.0  # > 0: weight-less RMS norms on dt_low, B and C after x_proj (FalconMamba)
    mixer_norm_weights: bool = False  # those norms with a weight each (Jamba)

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        from ..errors import InputError

        if values.get("mixer_norm_weights") and not values.get("mixer_rms_eps"):
            raise InputError(f"{where}: mixer_norm_weights needs the inner norms' mixer_rms_eps > 0")

    def __post_init__(self):
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.d_model / 16)
        for field in dataclasses.fields(self):
            allowed = CHOICES.get(field.name)
            if allowed is not None and getattr(self, field.name) not in allowed:
                raise ValueError(f"{field.name} must be one of {', '.join(allowed)}; got "
                                 f"{getattr(self, field.name)!r}")

@dataclass
class LMConfig(MambaConfig):
    """A causal language model: embedding, Mamba blocks, final norm, head."""

    vocab_size: int = 50280
    tie_embeddings: bool = True

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        super().check_consistency(values, where)
        if values["norm"] == "none" or not values["residual"]:
            from ..errors import InputError

            raise InputError(f"{where}: a language model here has RMSNorm residual blocks (norm 'rms', residual "
                             f"true); build other variants as a MambaModel")
        if values["bidirectional"] != "none" or values["conv"] != "causal":
            from ..errors import InputError

            raise InputError(f"{where}: a causal language model needs bidirectional 'none' and conv 'causal', got "
                             f"{values['bidirectional']!r} and {values['conv']!r}")


@dataclass
class ModelConfig(MambaConfig):
    """A model composed from parts around a stack of Mamba-1 blocks (`MambaModel`): stem -> class token ->
    position embedding -> blocks -> final norm -> pooling -> head. Stems: "embedding" (token ids (B, L)), "patch"
    (a conv over images (B, in_chans, img_size, img_size), patch_size x patch_size taps at `stride`), "flatten"
    (any input flattened to one token of in_features), "linear" (a linear per time step of (B, L, in_features)).
    Pooling "none" gives one output per token."""

    stem: str = "embedding"
    vocab_size: int = 256  # embedding stem
    img_size: int = 32  # patch stem
    patch_size: int = 4
    stride: int = 4
    in_chans: int = 3
    in_features: int = 1  # flatten and linear stems
    seq_len: int = 0  # the fixed input length of an embedding or linear stem (needed by a position embedding)
    cls_token: str = "none"  # where a learned class token is inserted: "none", "start", "middle", "end"
    pos_embed: bool = False  # a learned absolute position embedding added after the class token is inserted
    # "same" (the block norm's kind), "rms", "layer" (a LayerNorm with bias, whatever the blocks' norm), "none", or
    # "centered" (what norm fusion makes of a final LayerNorm over blocks of another kind: `CenteredRMSNorm`)
    final_norm: str = "same"
    pooling: str = "none"  # "none" (per token), "cls", "mean", "max", "last"
    head: str = "linear"  # "linear", or "mlp": Linear -> head_act -> Linear
    head_hidden: int = 0  # the MLP head's width; 0: d_model
    head_act: str = "gelu"
    num_classes: int = 10

    def __post_init__(self):
        super().__post_init__()
        if self.head_hidden == 0:
            self.head_hidden = self.d_model

    @property
    def final_norm_kind(self) -> str:
        return self.norm if self.final_norm == "same" else self.final_norm

    @property
    def grid_size(self) -> int:
        return (self.img_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def stem_tokens(self) -> int:
        """Tokens out of the stem: 0 where the input length varies."""
        return {"patch": self.num_patches, "flatten": 1}.get(self.stem, self.seq_len)

    @property
    def positions(self) -> int:
        """Sequence length through the blocks (class token included); 0 where the input length varies."""
        tokens = self.stem_tokens
        return tokens + (self.cls_token != "none") if tokens else 0

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        from ..errors import InputError

        super().check_consistency(values, where)
        problem = model_config_problem(values)
        if problem:
            raise InputError(f"{where}: {problem}")


def model_config_problem(c: dict) -> str | None:
    """What is inconsistent in a ModelConfig's fields (a dict), or None."""
    if c["stem"] == "patch" and c["patch_size"] > c["img_size"]:
        return f"patch_size {c['patch_size']} is larger than img_size {c['img_size']}"
    if c["pos_embed"] and c["stem"] in ("embedding", "linear") and not c["seq_len"]:
        return f"a position embedding with the {c['stem']} stem needs the input length: set seq_len"
    if c["pooling"] == "cls" and c["cls_token"] == "none":
        return "pooling 'cls' needs a class token: set cls_token to start, middle or end"
    final = c["norm"] if c["final_norm"] == "same" else c["final_norm"]
    if c["norm"] == "layer" and final != "layer":  # a final LayerNorm over blocks of another kind is fine
        return (f"LayerNorm blocks need a final LayerNorm too (a LayerNorm must be every reader of the residual "
                f"stream); got norm 'layer' and final norm {final!r}")
    return None


@dataclass
class VisionConfig(ModelConfig):
    """Vision Mamba (Vim): patch embedding, middle class token, absolute position embedding, bidirectional blocks,
    head on the class token."""

    stem: str = "patch"
    img_size: int = 224
    patch_size: int = 16
    stride: int = 16
    num_classes: int = 1000
    cls_token: str = "middle"
    pos_embed: bool = True
    pooling: str = "cls"
    bidirectional: str = "separate"


@dataclass
class TaggerConfig(ModelConfig):
    """A per-token classifier: embedding, Mamba blocks, final norm, a head giving one label per token."""

    num_classes: int = 2


@dataclass
class Mamba2Config(BlockConfig):
    """One stack of Mamba-2 (SSD) blocks. d_inner = expand * d_model splits into the SSM part (d_ssm channels =
    n_heads x head_dim, with B and C in n_groups groups of d_state, each group shared by n_heads / n_groups heads)
    and, where d_ssm < d_inner, a gated MLP of d_inner - d_ssm channels beside it (mamba_ssm's d_mlp)."""

    d_model: int = 768
    n_layer: int = 24
    d_state: int = 128
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    d_ssm: int = 0  # 0 means d_inner (no MLP part)
    d_conv: int = 4
    conv_bias: bool = True
    bias: bool = False  # bias on in_proj and out_proj
    norm_eps: float = 1e-5  # the block norms and the gated norm
    chunk_size: int = 256  # the checkpoint's training chunk; the CPU scan picks its own (results are the same)
    dt_limit_min: float = 0.0  # dt = clamp(softplus(dt + dt_bias), dt_limit_min, dt_limit_max)
    dt_limit_max: float = 0.0  # 0 means no upper limit
    inner_size: int = 0  # d_inner where it is not expand x d_model (Nemotron-H: heads x head_dim); 0: expand x d_model
    # norm(y * SiLU(z)) (Mamba-2), norm(y) * SiLU(z) or y * SiLU(z) without a norm (Falcon-H1's two variants)
    gated_norm: str = "after_gate"

    norm = "rms"  # not fields: Mamba-2 blocks are always RMSNorm residual blocks
    residual = True

    def __post_init__(self):
        if self.d_ssm == 0:
            self.d_ssm = self.d_inner

    @property
    def d_inner(self) -> int:
        return self.inner_size or self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_ssm // self.head_dim

    @property
    def d_mlp(self) -> int:
        return self.d_inner - self.d_ssm

    @property
    def conv_dim(self) -> int:
        """Channels through the depthwise conv: x, B and C."""
        return self.d_ssm + 2 * self.n_groups * self.d_state

    @property
    def in_proj_size(self) -> int:
        """in_proj's rows: [MLP gate | MLP input | z | x B C | dt]."""
        return 2 * self.d_mlp + self.d_ssm + self.conv_dim + self.n_heads

    def in_proj_rows(self) -> dict[str, slice]:
        """Where each part sits among in_proj's rows (the transforms scale and permute them)."""
        sizes = {"mlp_gate": self.d_mlp, "mlp_in": self.d_mlp, "z": self.d_ssm, "xBC": self.conv_dim,
                 "dt": self.n_heads}
        rows, start = {}, 0
        for name, size in sizes.items():
            rows[name] = slice(start, start + size)
            start += size
        return rows

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        from ..errors import InputError

        d_inner = values["inner_size"] or values["expand"] * values["d_model"]
        d_ssm = values["d_ssm"] or d_inner
        if d_ssm > d_inner:
            raise InputError(f"{where}: d_ssm {d_ssm} is larger than d_inner {d_inner}")
        if d_ssm % values["head_dim"]:
            raise InputError(f"{where}: the SSM's {d_ssm} channels do not split into heads of head_dim "
                             f"{values['head_dim']}; expected n_heads x head_dim = {d_ssm}")
        heads = d_ssm // values["head_dim"]
        if heads % values["n_groups"]:
            raise InputError(f"{where}: n_groups {values['n_groups']} does not divide the {heads} heads")
        if values["dt_limit_max"] and values["dt_limit_max"] < values["dt_limit_min"]:
            raise InputError(f"{where}: dt_limit_max {values['dt_limit_max']} is below dt_limit_min "
                             f"{values['dt_limit_min']}")


@dataclass
class Mamba2LMConfig(Mamba2Config):
    """A causal language model of Mamba-2 blocks: embedding, blocks, final norm, head."""

    vocab_size: int = 50280
    tie_embeddings: bool = True

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        super().check_consistency(values, where)
        if values["gated_norm"] != "after_gate":
            from ..errors import InputError

            raise InputError(f"{where}: gated_norm {values['gated_norm']!r}; a Mamba-2 language model keeps "
                             "norm(y * SiLU(z)) ('after_gate'); the other forms are Falcon-H1's, a hybrid")
