"""Evaluation protocols. Each result names its protocol so a number is never read without its convention."""

from functools import lru_cache

import torch
from torch import nn

from ..errors import InputError
from ..tasks import task_for, tasks_for
from .result import Result
from .tagging import typeseg_accuracy
from .text import bits_per_byte, lambada, lambada_passages, perplexity, wikitext2_test_text
from .vision import cifar10_top1


@lru_cache(maxsize=2)
def wikitext2_tokens(tokenizer, data: str | None) -> list[int]:
    return tokenizer.encode(wikitext2_test_text(data))  # 1.3 MB of text: tokenised once, not once per compared run


@torch.no_grad()
def evaluate(model: nn.Module, source: str, max_samples: int | None = None, reference: nn.Module | None = None,
             task: str | None = None, data: str | None = None, tokenizer: str | None = None,
             eval_data=None) -> Result:
    """Measure `model` with `task` (default: its main protocol); `max_samples` limits it to a fixed subset;
    `reference` (the full-precision model) adds the agreement of the predictions where the protocol has discrete
    predictions. For GPT-NeoX-tokenised LMs, `data` is the WikiText-2 raw test file or the LAMBADA jsonl and
    `tokenizer` the tokenizer.json (defaults: the data directory's, and the tokenizer.json that the model
    directory or hub snapshot `source` ships before it). `eval_data`, the user's own labelled set
    instead of a built-in protocol (top-1 % on its first `max_samples`): (inputs, labels) tensors, a Dataset or
    iterable of (input, label) pairs, an .npz or .pt file with "inputs" and "labels", or an ImageFolder-style
    directory (see `user_data.user_data`)."""
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise InputError(f"max_samples must be a positive integer (or None: all), got {max_samples!r}")
    if eval_data is not None:
        from .user_data import user_data, user_top1

        if task is not None:
            raise InputError(f"task {task!r} and eval_data are two protocols; expected one of them")
        accuracy, agreement, count, protocol = user_top1(model, user_data(eval_data, max_samples, "eval_data"),
                                                         reference)
        return Result(source, "top1", accuracy, True, protocol, count, agreement)
    task = task or task_for(model, source)
    if task not in tasks_for(model, source):
        raise InputError(f"{source}: task {task!r} does not apply to this model; expected one of "
                         f"{', '.join(tasks_for(model, source))}")
    if task == "bytes":
        from ..data import tinyshakespeare_validation

        bpb, windows = bits_per_byte(model, tinyshakespeare_validation(), max_windows=max_samples)
        protocol = "Tiny Shakespeare validation (last 10 %), non-overlapping 256-byte windows, bits per byte"
        return Result(source, "bits_per_byte", bpb, False, protocol, windows, extra={"byte_perplexity": 2**bpb})
    if task in ("wikitext2", "lambada"):
        from ..tokenizer import own_tokenizer, tokenizer_for

        bpe = tokenizer_for(model.config.vocab_size, tokenizer or own_tokenizer(source))
        if task == "wikitext2":
            ppl, windows = perplexity(model, wikitext2_tokens(bpe, data), max_windows=max_samples)
            protocol = ("WikiText-2 raw test joined with blank lines, GPT-NeoX tokens, non-overlapping 2048-token "
                        "windows, perplexity (GPTQ/Quamba convention)")
            return Result(source, "perplexity", ppl, False, protocol, windows)
        accuracy, word_ppl, count = lambada(model, bpe, lambada_passages(data), max_samples)
        protocol = "LAMBADA (OpenAI) test, greedy last-word accuracy %"
        return Result(source, "accuracy", accuracy, True, protocol, count, extra={"last_word_perplexity": word_ppl})
    if task == "cifar10":
        accuracy, agreement, count, protocol = cifar10_top1(model, max_samples, reference)
        return Result(source, "top1", accuracy, True, protocol, count, agreement)
    if task == "typeseg":
        accuracy, agreement, count, protocol = typeseg_accuracy(model, max_samples, reference)
        return Result(source, "byte_accuracy", accuracy, True, protocol, count, agreement)
    raise InputError(f"unknown evaluation task {task!r}")


def lm_eval(model: nn.Module, config, source: str | None = None, tokenizer: str | None = None,
            progress: bool = False) -> list[tuple[str, Result]]:
    """lm-evaluation-harness tasks on `model` (the `eval` extra): `config` is an `LMEvalConfig` or task names;
    `tokenizer` a tokenizer.json (default: the one in the `source` directory, else bytes for byte-level
    vocabularies, else GPT-NeoX's). Returns [(task, Result)], with the mean of the accuracies last when there
    are several."""
    from .local_tasks import LMEvalConfig, require_lm_eval

    require_lm_eval()
    from .harness import lm_eval_results

    from ..tokenizer import own_tokenizer

    config = config if isinstance(config, LMEvalConfig) else LMEvalConfig(config)
    tokenizer = tokenizer or own_tokenizer(source)  # a model directory's own tokenizer.json first
    return lm_eval_results(model, source or type(model).__name__, config, tokenizer, progress)
