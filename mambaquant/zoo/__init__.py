"""Embedded models, shipped inside the package: `mambaquant.load(NAME)` works offline for every name in `ZOO`.
Each lives in zoo/models/NAME/ as config.json + model.safetensors + card.json (data, recipe, command, metric)
+ MODEL_CARD.md."""

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

MODELS_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class ZooEntry:
    description: str
    task: str  # the evaluation protocol: "bytes", "cifar10" or "typeseg"


ZOO: dict[str, ZooEntry] = {
    "mamba-shakespeare": ZooEntry(
        "byte-level Mamba-1 LM (Hugging Face Mamba architecture), trained here on Tiny Shakespeare", "bytes"
    ),
    "vim-cifar10": ZooEntry(
        "Vision Mamba (bidirectional blocks, middle class token), trained here on CIFAR-10", "cifar10"
    ),
    "typeseg": ZooEntry(
        "typeseg 0.2.7's per-byte content-type tagger: 6 bidirectional Mamba blocks, trained by its author", "typeseg"
    ),
}


def card(name: str) -> dict:
    return json.loads((MODELS_DIR / name / "card.json").read_text())


def load_zoo_model(name: str) -> nn.Module:
    from ..loaders import load_directory

    return load_directory(MODELS_DIR / name)
