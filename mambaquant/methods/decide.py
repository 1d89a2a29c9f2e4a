"""A recipe's optional parts decided for the model at hand (`QuantConfig.decide`), by cross-validation on the
calibration set (never evaluation data): the calibration inputs are split into FOLDS folds, every input held back
in exactly one, and for each fold the recipe is fit on the other folds and its error measured on the held-back one.
The error is that of the model's output: the KL divergence of its predictions (next-token, class or tag
probabilities) from the full-precision model's, which the evaluation's metrics follow (a squared error of the logits
does not: on a time-series classifier it favoured a weight clipping that cost 5 points of top-1).

Parts are tried one at a time, each against the recipe as decided so far, on the same held-back inputs with and
without it (paired). A part is dropped where it does nothing to the held-back outputs, or where the error without it
is lower by at least MARGIN standard errors of the per-input paired differences; otherwise the recipe as designed
is kept. One held-back quarter alone decides by noise: on a vision model with 16 held-back images the clipping
search was dropped on a difference that the other three quarters reversed, and the errors of one recipe fit on
different calibration subsets vary more than the parts' effects there. Over four orderings of the generality
suite's calibration sets, one held-back quarter's decisions changed with the ordering in 18 of 28 cells and gave a
higher KL divergence on the evaluation data than the recipe as designed in 9 of the 4 x 28; these rules' decisions
changed in 6 cells and never gave a higher one. A comparison stops early, after at least MIN_FOLDS folds, once its
difference is beyond MARGIN standard errors either way (or is exactly nothing). The report says what each part did:
kept or dropped, its error with and without it over how many held-back inputs, and by how much it changed it
(`QuantReport.decisions`).

Cost, in runs of the recipe: at most FOLDS x (1 + parts) runs on (FOLDS - 1) / FOLDS of the calibration set (each
configuration's fold runs are shared between the comparisons it is in), then the final run on all of it: at most
4 x 5 + 1 for mambaquant+ at W4A4 (four parts), 4 x 4 + 1 at W8A8 / W4A8 (three), 4 x 3 + 1 for two parts
(MambaQuant with `auto` and its smoothing; mambaquant+ at W4A16), 4 x 2 + 1 for one (MambaQuant at W4A16); fewer where
a comparison stops early or a part has no effect. Each held-back
error is one more forward pass of the quantized model over a quarter of the calibration set."""

import math
from dataclasses import replace

import torch

from ..errors import InputError
from .config import AUTO_METHODS, FULL_PRECISION, QuantConfig
from .walk import run_recipe

FOLDS = 4  # the calibration inputs are split into this many folds; each is held back once (fewer inputs: one each)
MARGIN = 2.0  # a part is dropped only where its error is higher by at least this many standard errors
MIN_FOLDS = 2  # a comparison stops early (difference beyond MARGIN standard errors) after at least this many folds


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
    if config.smooth and config.method in AUTO_METHODS:  # last: tried first, it cost timeseries W4A4 5 points
        parts.append(("the smoothing (S-SiLU at out_proj, the conv1d, dt_proj and h·C inputs; in a hybrid the values "
                      "and the down_proj inputs)", {"smooth": False}))
    return parts


def split_folds(batches: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(fit, held back) for each fold: input i is held back in fold i % FOLDS and fit in every other fold."""
    inputs = [x for batch in batches for x in batch]
    if len(inputs) < 2:
        raise InputError("decide holds back part of the calibration set: expected at least 2 calibration inputs, got "
                         f"{len(inputs)}")
    folds = min(FOLDS, len(inputs))
    size = len(batches[0])
    return [(rebatched([x for i, x in enumerate(inputs) if i % folds != fold], size),
             rebatched([x for i, x in enumerate(inputs) if i % folds == fold], size)) for fold in range(folds)]


def rebatched(inputs: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    return [torch.stack(inputs[start:start + size]) for start in range(0, len(inputs), size)]


@torch.no_grad()
def held_back_errors(model, held: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """Per held-back input, the mean KL divergence of the model's predictions from the full-precision ones
    (`reference`: its log probabilities) over the input's outputs (every position of a language model or tagger)."""
    errors = []
    for x, want in zip(held, reference):
        got = torch.log_softmax(model(x).float(), dim=-1)
        kl = (want.exp() * (want - got)).sum(-1)
        errors.append(kl.reshape(len(kl), -1).mean(1).double())
    return torch.cat(errors)


def without_parts(config: QuantConfig, parts: list[tuple[str, dict]], dropped) -> QuantConfig:
    """`config` with the parts whose indices are in `dropped` taken out."""
    return replace(config, **{key: value for index, (_, change) in enumerate(parts) if index in dropped
                              for key, value in change.items()})


def paired(differences: list[torch.Tensor]) -> tuple[float, float, int]:
    """(mean, standard error of the mean, count) of per-input paired differences."""
    d = torch.cat(differences)
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.inf
    return float(d.mean()), se, len(d)


def decide(model, config: QuantConfig, batches: list[torch.Tensor]) -> tuple[QuantConfig, list[str]]:
    """`config` with the optional parts dropped that do nothing or raise the held-back output error beyond noise,
    and the report's lines on each part."""
    parts = optional_parts(config)
    if not parts:
        return config, [f"decide: {config.method} at w{config.w_bits}a{config.a_bits} has no optional part to decide"]
    folds = split_folds(batches)
    with torch.no_grad():
        references = [[torch.log_softmax(model(x).float(), dim=-1) for x in held] for _, held in folds]
    measured = {}  # (dropped parts, fold) -> per-input errors on that fold's held-back inputs

    def errors(dropped: frozenset, fold: int) -> torch.Tensor:
        if (dropped, fold) not in measured:
            fit, held = folds[fold]
            quantized, _ = run_recipe(model, without_parts(config, parts, dropped), fit)
            measured[dropped, fold] = held_back_errors(quantized, held, references[fold])
        return measured[dropped, fold]

    dropped = frozenset()
    lines = []
    for index, (name, _) in enumerate(parts):
        without = dropped | {index}
        differences = []  # error with the part minus error without it, per held-back input: > 0 where it hurts
        for fold in range(len(folds)):
            differences.append(errors(dropped, fold) - errors(without, fold))
            mean, se, count = paired(differences)
            if fold + 1 >= min(MIN_FOLDS, len(folds)) and abs(mean) >= MARGIN * se:
                break  # a difference beyond noise either way, or none at all on any held-back output
        with_it = float(torch.cat([errors(dropped, f) for f in range(fold + 1)]).mean())
        without_it = float(torch.cat([errors(without, f) for f in range(fold + 1)]).mean())
        where = f"{count} held-back inputs in {fold + 1} of {len(folds)} folds"
        detail = (f"{(with_it - without_it) / without_it:+.1%} with it" if without_it > 0 else "0 without it") + \
            f"; difference {mean:.3g} ± {se:.2g} per input over {where}"
        if mean == 0 and se == 0:
            lines.append(f"dropped {name}: no effect on the outputs (error {with_it:.4g} with and without it, {where})")
            dropped = without
        elif mean >= MARGIN * se:
            lines.append(f"dropped {name}: error {without_it:.4g} without it, {with_it:.4g} with it ({detail})")
            dropped = without
        else:
            noise = "" if -mean >= MARGIN * se else f"; within {MARGIN:g} standard errors: kept as designed"
            lines.append(f"kept {name}: error {with_it:.4g} with it, {without_it:.4g} without it ({detail}{noise})")
    inputs = sum(len(batch) for _, held in folds for batch in held)
    header = (f"decided by {len(folds)}-fold cross-validation on {inputs} calibration inputs, each held back once with "
              f"the recipe fit on the rest ({len(measured)} runs of the recipe, then the final one on all of them): "
              "error = mean KL divergence of the predictions from the full-precision ones; a part is dropped where it "
              f"does nothing or its error is higher by at least {MARGIN:g} standard errors")
    return without_parts(config, parts, dropped), [header] + lines


def decided_recipe(model, config: QuantConfig, batches: list[torch.Tensor], progress: bool = False):
    """`run_recipe` on every calibration input with the parts `decide` keeps; the report says what was decided."""
    config, lines = decide(model, config, batches)
    quantized, report = run_recipe(model, config, batches, progress)
    report.decisions = lines
    return quantized, report
