"""Language-model metrics: bits per byte for byte-level models; WikiText-2 perplexity (GPTQ/Quamba convention) and
LAMBADA last-word accuracy for GPT-NeoX-tokenised models (the state-spaces Mamba checkpoints)."""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import shared_data_dir
from ..errors import InputError
from ..inputs import read_text, regular_file
from ..memory import check_allocation

LOGIT_COPIES = 3  # the logits, their float32 copy and cross_entropy's log-softmax


def check_logits(model, positions: int, what: str) -> None:
    """Refuse an evaluation whose logits would not fit in memory, before the model runs (for a model that says its
    vocabulary size)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        return
    check_allocation(positions * vocab * 4 * LOGIT_COPIES, f"{what} ({positions:,} positions x {vocab:,} logits)")


@torch.no_grad()
def bits_per_byte(model, text: bytes, window: int = 256, batch_size: int = 16, max_windows: int | None = None):
    """Mean next-byte negative log-likelihood in bits. The text is cut into windows of window+1 bytes that overlap
    by one, so every byte after the first is predicted exactly once, from the bytes before it in its window."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    count = (len(data) - 1) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"text of {len(data)} bytes is shorter than one window of {window + 1}")
    check_logits(model, min(batch_size, count) * window, "evaluating a batch of byte windows")
    windows = torch.stack([data[i * window : i * window + window + 1] for i in range(count)])
    total_nll = 0.0
    for batch in windows.split(batch_size):
        logits = model(batch[:, :-1])
        total_nll += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
    return total_nll / (count * window) / math.log(2), count


def logits_from(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """The logits at positions start.. only: for our runtime the head runs on those alone."""
    if hasattr(model, "hidden_states"):
        return model.output(model.hidden_states(ids)[:, start:])
    return model(ids)[:, start:]


def data_file(path: str | Path | None, relative: str, what: str) -> Path:
    """`path` if given, else `relative` inside the data directory; a clear error when neither exists."""
    if path is None:
        data = shared_data_dir()
        if data is None or not (data / relative).is_file():
            raise InputError(f"{what} not found: expected {relative} in the data directory (set MAMBAQUANT_DATA) "
                             f"or pass its path")
        return data / relative
    return regular_file(path, what)


def wikitext2_test_text(path: str | Path | None = None) -> str:
    """The raw WikiText-2 test split as the GPTQ/Quamba evaluation joins it: its lines joined with blank lines.
    (The data directory's copy has its blank lines dropped; joining non-empty lines with "\\n\\n" restores it.)"""
    file = data_file(path, "wikitext-2-raw/wiki.test.raw", "the WikiText-2 raw test split")
    lines = read_text(file, "the WikiText-2 raw test split", copies=30)  # the text and its BPE tokens
    return "\n\n".join(line.strip("\r") for line in lines.split("\n") if line.strip())


@torch.no_grad()
def perplexity(model, tokens: list[int], window: int = 2048, max_windows: int | None = None) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of `window` tokens (the last partial window dropped), each
    evaluated from an empty state: the GPTQ convention. Returns (perplexity, windows)."""
    data = torch.tensor(tokens)
    count = len(data) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise InputError(f"the text has {len(data)} tokens, fewer than one window of {window}")
    check_logits(model, window, "evaluating a WikiText-2 window")
    total_nll = 0.0
    for i in range(count):
        chunk = data[i * window : (i + 1) * window][None]
        logits = model(chunk)[0, :-1].float()
        total_nll += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
    return math.exp(total_nll / (count * (window - 1))), count


def lambada_passages(path: str | Path | None = None) -> list[str]:
    file = data_file(path, "lambada/lambada_test.jsonl", "the LAMBADA (OpenAI) test jsonl")
    try:
        return [json.loads(line)["text"] for line in read_text(file, "the LAMBADA (OpenAI) test jsonl", copies=10)
                .splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{file}: expected one JSON object with a 'text' field per line (LAMBADA OpenAI)") from None


@torch.no_grad()
def lambada(model, tokenizer, passages: list[str], max_samples: int | None = None) -> tuple[float, float, int]:
    """LAMBADA (OpenAI): a passage is right when every token of its last word (with its leading space) is the
    greedy prediction given the text before it. Returns (accuracy %, perplexity of the last word, passages)."""
    passages = passages[:max_samples]
    check_logits(model, 1024, "evaluating a LAMBADA passage")
    correct, total_nll = 0, 0.0
    for passage in passages:
        context, word = passage.rsplit(" ", 1)
        context_ids, target_ids = tokenizer.encode(context), tokenizer.encode(" " + word)
        ids = torch.tensor(context_ids + target_ids)[None, :-1]
        logits = logits_from(model, ids, len(context_ids) - 1)[0].float()
        target = torch.tensor(target_ids)
        correct += bool((logits.argmax(-1) == target).all())
        total_nll += F.cross_entropy(logits, target, reduction="sum").item()
    return 100.0 * correct / len(passages), math.exp(total_nll / len(passages)), len(passages)
