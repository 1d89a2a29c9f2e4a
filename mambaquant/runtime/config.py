"""Small config dataclasses for the Mamba runtime (Mamba-1 and Mamba-2 blocks); they serialise to and from plain
JSON dicts."""

import dataclasses
import math
from dataclasses import dataclass

NORMS = ("rms", "layer")
CONVS = ("causal", "same")
BIDIRECTIONAL = ("none", "separate", "shared")
CHOICES = {"norm": NORMS, "conv": CONVS, "bidirectional": BIDIRECTIONAL}
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
    "vocab_size": (1, 2**24),
    "num_classes": (1, 2**20),
    "img_size": (1, 8192),
    "patch_size": (1, 1024),
    "stride": (1, 1024),
    "in_chans": (1, 64),
    "head_dim": (1, 65536),
    "n_groups": (1, 65536),
    "d_ssm": (0, 16 * 65536),  # 0: d_inner
    "chunk_size": (1, 65536),
    "dt_limit_min": (0.0, 1e9),
    "dt_limit_max": (0.0, 1e9),  # 0: no upper limit
}
POSITIVE = {"norm_eps"}  # the lower bound itself is excluded


class BlockConfig:
    """What every block config shares: JSON round trip with every field checked."""

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
    def schema(cls, limits: dict = LIMITS) -> dict:
        """The `mambaquant.schema` schema of this dataclass: one field per dataclass field, from its type, `limits`
        (as `LIMITS`; None: no bound) and `CHOICES`."""
        from ..schema import boolean, integer, number, string

        schema = {}
        for f in dataclasses.fields(cls):
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if f.name in CHOICES:
                schema[f.name] = string(*CHOICES[f.name], default=f.default)
            elif kind == "bool":
                schema[f.name] = boolean(f.default)
            elif kind == "int":
                schema[f.name] = integer(*limits[f.name], default=f.default)
            elif kind == "float":
                schema[f.name] = number(*limits[f.name], default=f.default, above=f.name in POSITIVE)
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
    norm: str = "rms"  # "rms" (Mamba, Vim) or "layer" (LayerNorm with bias)
    norm_eps: float = 1e-5
    # "none"; "separate": a second SSM branch (own conv, x_proj, dt_proj, A, D) on the reversed sequence (Vim v2);
    # "shared": the same SSM inputs also scanned backwards in time with the same parameters
    bidirectional: str = "none"
    divide_out: bool = True  # bidirectional only: average the two directions instead of adding them

    def __post_init__(self):
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.d_model / 16)
        for field, allowed in (("norm", NORMS), ("conv", CONVS), ("bidirectional", BIDIRECTIONAL)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {', '.join(allowed)}; got {getattr(self, field)!r}")

@dataclass
class LMConfig(MambaConfig):
    """A causal language model: embedding, Mamba blocks, final norm, head."""

    vocab_size: int = 50280
    tie_embeddings: bool = True

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        if values["bidirectional"] != "none" or values["conv"] != "causal":
            from ..errors import InputError

            raise InputError(f"{where}: a causal language model needs bidirectional 'none' and conv 'causal', got "
                             f"{values['bidirectional']!r} and {values['conv']!r}")


@dataclass
class VisionConfig(MambaConfig):
    """Vision Mamba (Vim): patch embedding, absolute position embedding, middle class token, bidirectional blocks."""

    img_size: int = 224
    patch_size: int = 16
    stride: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    bidirectional: str = "separate"

    @classmethod
    def check_consistency(cls, values: dict, where: str) -> None:
        if values["patch_size"] > values["img_size"]:
            from ..errors import InputError

            raise InputError(f"{where}: patch_size {values['patch_size']} is larger than img_size {values['img_size']}")

    @property
    def grid_size(self) -> int:
        return (self.img_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class TaggerConfig(MambaConfig):
    """A per-token classifier: embedding, Mamba blocks, final norm, a head giving one label per token."""

    vocab_size: int = 256
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

    norm = "rms"  # not a field: Mamba-2 blocks always use RMSNorm

    def __post_init__(self):
        if self.d_ssm == 0:
            self.d_ssm = self.d_inner

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

        d_inner = values["expand"] * values["d_model"]
        d_ssm = values["d_ssm"] or d_inner
        if d_ssm > d_inner:
            raise InputError(f"{where}: d_ssm {d_ssm} is larger than d_inner = expand x d_model = {d_inner}")
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
