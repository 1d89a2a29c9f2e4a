"""Embedded models: `mambaquant.load(NAME)` works offline for every name in `ZOO`."""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..runtime import LMConfig, MambaLM, init_weights


@dataclass(frozen=True)
class ZooEntry:
    description: str
    task: str  # the evaluation protocol: "bytes" (bits per byte on held-out text)
    trained: bool
    build: Callable[[], nn.Module]


def tiny_random_lm() -> MambaLM:
    config = LMConfig(d_model=128, n_layer=4, vocab_size=256, tie_embeddings=True)
    return init_weights(MambaLM(config), std=0.02, seed=0).eval()


ZOO: dict[str, ZooEntry] = {
    "mamba-tiny-random": ZooEntry(
        description="RANDOM-INITIALISED (untrained) byte-level Mamba LM, 4 layers x 128, seed 0: a placeholder "
        "that exercises the pipeline until trained models land; its metrics mean nothing",
        task="bytes",
        trained=False,
        build=tiny_random_lm,
    ),
}
DEFAULT_MODEL = "mamba-tiny-random"


def load_zoo_model(name: str) -> nn.Module:
    return ZOO[name].build()
