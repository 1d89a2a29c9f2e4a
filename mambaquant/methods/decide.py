"""A recipe's optional parts decided for the model at hand (`QuantConfig.decide`): part of the calibration set is
held back (never evaluation data), the recipe is run on the rest with and without each part in turn, and a part is
kept only where it lowers the model output's error on the held-back inputs: the KL divergence of its predictions
(next-token, class or tag probabilities) from the full-precision model's, which the evaluation's metrics follow
(a squared error of the logits does not: on a time-series classifier it favoured a weight clipping that cost 5
points of top-1). Parts are tried one at a time, each against the recipe as decided so far; the report says what
each did (`QuantReport.decisions`). Cost: one more run of the recipe per part tried, each on the calibration set
less the held-back part."""

from dataclasses import replace

import torch

from ..errors import InputError
from .config import FULL_PRECISION, QuantConfig
from .walk import run_recipe

HELD_BACK = 4  # one calibration input in this many is held back (at least one)


def optional_parts(config: QuantConfig) -> list[tuple[str, dict]]:
    """The parts of the recipe that may be dropped, each as (what it is, the config without it); `auto` first, since
    with the clipping search it weighs its choices by their clipped errors."""
    parts = []
    if config.act_granularity == "auto" and config.a_bits != FULL_PRECISION:
        parts.append(("auto's per-site granularity (against dynamic per-token ranges everywhere)",
                      {"act_granularity": "token"}))
    if config.clip_search:
        parts.append(("clipping searched per weight channel and activation site", {"clip_search": False}))
    if config.site_bits is None:  # mambaquant+'s mixed precision at 4-bit activations
        parts.append(("the SSM's own activations at 8 bits", {"site_bits": {}}))
    return parts


def split_held_back(batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(fit, held back): the last of every HELD_BACK calibration inputs held back."""
    inputs = [x for batch in batches for x in batch]
    if len(inputs) < 2:
        raise InputError("decide holds back part of the calibration set: expected at least 2 calibration inputs, got "
                         f"{len(inputs)}")
    held = [i for i in range(len(inputs)) if i % HELD_BACK == HELD_BACK - 1] or [len(inputs) - 1]
    fit = [x for i, x in enumerate(inputs) if i not in held]
    size = len(batches[0])
    return rebatched(fit, size), rebatched([inputs[i] for i in held], size)


def rebatched(inputs: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    return [torch.stack(inputs[start:start + size]) for start in range(0, len(inputs), size)]


@torch.no_grad()
def output_error(model, held: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The mean KL divergence of the model's predictions from the full-precision ones (`reference`: its log
    probabilities) over the held-back inputs' outputs (every position of a language model or tagger)."""
    total, count = 0.0, 0
    for x, want in zip(held, reference):
        got = torch.log_softmax(model(x).float(), dim=-1)
        total += float((want.exp() * (want - got)).sum())
        count += want[..., 0].numel()
    return total / count


def decide(model, config: QuantConfig, batches: list[torch.Tensor]) -> tuple[QuantConfig, list[str]]:
    """`config` with the optional parts that do not lower the held-back output error dropped, and the report's
    lines on each part."""
    parts = optional_parts(config)
    if not parts:
        return config, [f"decide: {config.method} at w{config.w_bits}a{config.a_bits} has no optional part to decide"]
    fit, held = split_held_back(batches)
    with torch.no_grad():
        reference = [torch.log_softmax(model(x).float(), dim=-1) for x in held]

    def error_of(trial: QuantConfig) -> float:
        quantized, _ = run_recipe(model, trial, fit)
        return output_error(quantized, held, reference)

    best = error_of(config)
    lines = [f"decided on {sum(map(len, held))} held-back calibration inputs (fit on {sum(map(len, fit))}): the "
             f"recipe's output error {best:.4g} (mean KL divergence from the full-precision predictions)"]
    for name, change in parts:
        trial = replace(config, **change)
        error = error_of(trial)
        if error <= best:  # kept only where it lowers the error
            lines.append(f"dropped {name}: error {error:.4g} without it, {best:.4g} with it")
            config, best = trial, error
        else:
            lines.append(f"kept {name}: error {best:.4g} with it, {error:.4g} without it")
    return config, lines


def decided_recipe(model, config: QuantConfig, batches: list[torch.Tensor], progress: bool = False):
    """`run_recipe` on every calibration input with the parts `decide` keeps; the report says what was decided."""
    config, lines = decide(model, config, batches)
    quantized, report = run_recipe(model, config, batches, progress)
    report.decisions = lines
    return quantized, report

