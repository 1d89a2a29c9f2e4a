"""Embedded models, shipped inside the package: `mambaquant.load(NAME)` works offline for every name in `ZOO`.
Each lives in zoo/models/NAME/ as config.json + model.safetensors + card.json (data, recipe, command, metric)
+ MODEL_CARD.md."""

import json
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class ZooEntry:
    description: str
    task: str  # the evaluation protocol: "bytes", "cifar10" or "typeseg"


ZOO: dict[str, ZooEntry] = {
    "mamba-shakespeare": ZooEntry(
        "byte-level Mamba-1 LM (Hugging Face Mamba architecture), trained here on Tiny Shakespeare", "bytes"
    ),
    "mamba2-shakespeare": ZooEntry(
        "byte-level Mamba-2 LM (Hugging Face Mamba2 architecture), trained here on Tiny Shakespeare", "bytes"
    ),
    "hybrid-shakespeare": ZooEntry(
        "byte-level hybrid LM (Nemotron-H-style Mamba-2, attention and MLP blocks), trained here on Tiny Shakespeare",
        "bytes"
    ),
    "vim-cifar10": ZooEntry(
        "Vision Mamba (bidirectional blocks, middle class token), trained here on CIFAR-10", "cifar10"
    ),
    "typeseg": ZooEntry(
        "typeseg 0.2.7's per-byte content-type tagger: 6 bidirectional Mamba blocks, trained by its author", "typeseg"
    ),
}


ZOO_PREFIX = "zoo:"  # `zoo:NAME` is always the embedded model, even where a path NAME exists


def embedded_name(source) -> str | None:
    """The embedded model a source string names (`NAME` or `zoo:NAME`), else None. Whether a bare NAME is shadowed
    by a path of that name is `loaders.resolve_source`'s business."""
    if not isinstance(source, str):
        return None
    name = source[len(ZOO_PREFIX):] if source.startswith(ZOO_PREFIX) else source
    return name if name in ZOO else None


def card(name: str) -> dict:
    return json.loads((MODELS_DIR / (embedded_name(name) or name) / "card.json").read_text())
