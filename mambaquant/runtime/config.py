"""Small config dataclasses for the Mamba runtime; they serialise to and from plain JSON dicts."""

import dataclasses
import math
from dataclasses import dataclass

NORMS = ("rms", "layer")
CONVS = ("causal", "same")
BIDIRECTIONAL = ("none", "separate", "shared")


@dataclass
class MambaConfig:
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

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class LMConfig(MambaConfig):
    """A causal language model: embedding, Mamba blocks, final norm, head."""

    vocab_size: int = 50280
    tie_embeddings: bool = True


@dataclass
class VisionConfig(MambaConfig):
    """Vision Mamba (Vim): patch embedding, absolute position embedding, middle class token, bidirectional blocks."""

    img_size: int = 224
    patch_size: int = 16
    stride: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    bidirectional: str = "separate"

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
