"""Per-byte content-type accuracy of a typeseg-style tagger on a pinned corpus of real files."""

from pathlib import Path

import torch

from ..data import PACKAGE_DATA, TYPESEG_LABELS

CORPUS = PACKAGE_DATA / "typeseg_corpus"


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if "__" in p.name)


@torch.no_grad()
def typeseg_accuracy(model, max_samples: int | None = None, reference=None):
    """% of bytes whose argmax label is the file's label, over the corpus (or its first `max_samples` files).
    Returns (accuracy, agreement with `reference` or None, bytes, protocol)."""
    from ..loaders.typeseg import typeseg_tokens

    files = corpus_files()[:max_samples]
    correct = agree = total = 0
    for path in files:
        tokens = typeseg_tokens(path.read_bytes())[None]
        predictions = model(tokens)[0].argmax(-1)
        correct += (predictions == TYPESEG_LABELS.index(path.name.split("__")[0])).sum().item()
        if reference is not None:
            agree += (predictions == reference(tokens)[0].argmax(-1)).sum().item()
        total += len(predictions)
    protocol = f"per-byte accuracy against the file-type label, {len(files)} pinned real files ({total} bytes)"
    return 100.0 * correct / total, (100.0 * agree / total if reference is not None else None), total, protocol
