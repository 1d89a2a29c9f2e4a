"""`analyze`: the outliers at every site of a model, the scan's heavy tails, what each transform does to the channels,
and the quantization error of each method, as stats.json, summary.md, PNG plots and an index.html.

Everything is measured on the same calibration inputs (training data only, `resolve_calibration`): the statistics in
one full-precision pass with an observer at every site (`stats.SiteStatistics`, bounded memory), the SQNR with each
method's quantized model (`quantize`) on those inputs again (`error.measure`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration import resolve_calibration
from ..errors import InputError
from ..methods import METHODS, PRESETS, Runner, methods_for, quantize
from ..methods.granularity import CHUNKED_SITES
from ..methods.stages import block_activation_sites, fixed_length, head_activation_sites, kind_of, part_linears, parts
from ..outputs import check_output_dir, write_atomic_dir
from ..schema import check_options
from ..progress import progress as progress_of
from ..runtime import find_sites
from ..runtime.moe import MoE
from .error import SQNR, measure
from .stats import (
    AUTO,
    HISTOGRAM_EDGES,
    KURTOSIS,
    MAMBAQUANT_TRANSFORM,
    POSITION_BINS,
    TOKEN,
    TOKEN_OUTLIER_RATIOS,
    TRANSFORM_NAMES,
    TRANSFORMS_AT,
    SequenceClock,
    SiteStatistics,
    SketchConfig,
    key_site_names,
    transform_statistics,
)

QUANTIZING_METHODS = tuple(m for m in METHODS if m != "fp")
CHANNEL = ("the last dimension of the site's tensor: d_model or d_inner at the (B, L, C) sites, the state dimension "
           "N at the scan sites dA, dBu and h (B, T, E, N)")


@dataclass
class AnalysisConfig:
    calib: object = None  # a tensor of inputs, a calibration set or training text file; None: the model's default
    calib_samples: int = 32
    calib_len: int | None = None
    methods: tuple[str, ...] | None = None  # None: every quantizing method for the model's block kind
    bits: tuple[str, ...] = ("w8a8", "w4a8")
    seed: int = 0
    batch_size: int = 4  # inputs per forward pass here (quantize calibrates in its own batches)
    sketch: SketchConfig = field(default_factory=SketchConfig)

    def __post_init__(self):
        if self.methods is not None:
            unknown = [m for m in self.methods if m not in QUANTIZING_METHODS]
            if unknown or not self.methods:
                raise InputError(f"unknown method(s) {', '.join(unknown) or '(none)'}; expected a comma-separated "
                                 f"list from {','.join(QUANTIZING_METHODS)}")
        unknown = [b for b in self.bits if b.lower() not in PRESETS]
        if unknown:
            raise InputError(f"unknown bit widths {', '.join(unknown)}; expected presets from {','.join(PRESETS)}")


def capture(model, batches: list[torch.Tensor], sketch: SketchConfig, progress: bool) -> dict[str, SiteStatistics]:
    """Statistics at every site over the calibration inputs, in one full-precision pass."""
    key, auto = set(key_site_names(model)), quantized_site_names(model)
    sites, clock = find_sites(model), SequenceClock()
    statistics = {name: SiteStatistics(sketch, key=name in key, auto=name in auto, absolute=fixed_length(model),
                                       clock=clock) for name in sites}
    Runner(model, restarting(progress_of(batches, "statistics", "batch", progress), clock)).observe(
        {sites[name]: observer for name, observer in statistics.items()})
    return statistics


def quantized_site_names(model) -> set[str]:
    """The sites the methods quantize (`activation_sites`), as the full-precision model names them: a mixture of
    experts holds its experts stacked there (`moe_activation_sites`)."""
    sites = head_activation_sites(model)
    for block in model.layers:
        sites += moe_activation_sites(block.mixer) if isinstance(block.mixer, MoE) else block_activation_sites(block)
    return {site.name for site in sites}


def moe_activation_sites(moe) -> list:
    """Quantization makes each expert an MLP with its own sites (`experts_as_lists`); in the full-precision model the
    experts' inputs pass the MoE's expert_in site, their down_proj inputs its one expert_down_in site."""
    latent = [moe.sites[kind] for kind in ("fc1_latent_in", "fc2_latent_in") if kind in moe.sites]
    shared = [site for _, _, site in part_linears(moe.shared_expert, None)] if moe.shared_expert is not None else []
    return latent + [moe.sites["expert_in"], moe.experts.sites["expert_down_in"]] + shared


def layer_kind(block) -> str:
    """The kinds of layer a block is made of (`LAYER_KINDS`): "mamba2 + attention" for Falcon-H1's parallel mixer."""
    return " + ".join(kind_of(part) for part in parts(block))


def restarting(batches, clock: SequenceClock):
    for batch in batches:
        clock.restart()
        yield batch


def describe_calibration(calib) -> str:
    if calib is None:
        return "the model's default training set"
    if isinstance(calib, (str, Path)):
        return str(calib)
    if isinstance(calib, torch.Tensor):
        return f"user tensor {tuple(calib.shape)}"
    return f"user {type(calib).__name__}" + (f" of {len(calib)} items" if hasattr(calib, "__len__") else "")


def quantization_error(model, batches: list[torch.Tensor], config: AnalysisConfig, progress: bool) -> dict:
    """method -> bits -> SQNR (see `error`), each method with its own defaults (granularity, rounding)."""
    methods = [m for m in methods_for(model, config.methods) if m != "fp"]
    runs = [(method, bits) for method in methods for bits in config.bits]
    inputs = torch.cat(batches)
    results = {}
    for method, bits in progress_of(runs, "methods", "run", progress, label=" ".join):
        w_bits, a_bits = PRESETS[bits.lower()]
        quantized = quantize(model, method=method, w_bits=w_bits, a_bits=a_bits, calib=inputs,
                             calib_samples=len(inputs), seed=config.seed)
        run = results.setdefault(method, {})[bits.lower()] = measure(quantized, model, batches)
        if quantized.quantization_report.granularity_reasons:  # "auto" (MambaQuant's default), after its transforms
            run["granularity_reasons"] = quantized.quantization_report.granularity_reasons
    return results


def site_record(name: str, site, statistics: SiteStatistics, fixed: bool) -> dict:
    parts = name.split(".")
    layer = int(parts[1]) if parts[0] == "layers" else None
    record = {"kind": site.kind, "layer": layer, **statistics.summary()}
    if statistics.auto is not None:
        record["auto"] = statistics.auto_choice(fixed and site.kind not in CHUNKED_SITES)
    return record


def analyze(source, out_dir: str | Path, config: AnalysisConfig | None = None, overwrite: bool = False,
            progress: bool = False, **options) -> dict:
    """Analyze `source` (a model, an embedded model name, a directory or a checkpoint) and write `out_dir`:
    stats.json, summary.md, plots/*.png and index.html (atomically: a temporary directory renamed at the end).
    `options` are `AnalysisConfig` fields. Returns what stats.json holds."""
    from ..loaders import load
    from . import plots, report

    config = config or AnalysisConfig(**check_options(AnalysisConfig, options, "analyze"))
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    out_dir = check_output_dir(out_dir, overwrite, sources=[source])  # first: --overwrite never takes the source
    check_full_precision(source, name)
    model = load(source).eval()
    methods_for(model, config.methods)  # a method that does not apply to this block kind fails before any work
    batches = resolve_calibration(model, name, config.calib, config.calib_samples, config.calib_len, config.seed,
                                  batch_size=config.batch_size)
    statistics = capture(model, batches, config.sketch, progress)
    sites = find_sites(model)
    results = {
        "model": name,
        "architecture": type(model).__name__,
        "layer_kinds": [layer_kind(block) for block in model.layers],
        "calibration": {"set": describe_calibration(config.calib), "samples": sum(map(len, batches)),
                        "input_shape": list(batches[0].shape[1:]), "seed": config.seed},
        "definitions": {
            "channel": CHANNEL, "kurtosis": KURTOSIS, "sqnr": SQNR,
            "channel_max_ratio": "largest per-channel |x| max / median per-channel |x| max",
            "variance_max_min": "largest / smallest per-channel variance (smallest floored at 1e-12)",
            "variance_cv": "coefficient of variation of the per-channel variances (std / mean)",
            "sampling": f"maxima, moments and histograms over every value; covariances (variances after a "
                        f"transform) over at most {config.sketch.covariance_rows} rows of each tensor (uniform, "
                        f"seeded); max profiles after a transform over the {config.sketch.kept_rows} rows of "
                        "largest norm",
            "token": TOKEN,
            "token_outliers": (f"share of tokens whose max exceeds k x the median token max, k = "
                               f"{' and '.join(f'{k:g}' for k in TOKEN_OUTLIER_RATIOS)}; positions "
                               + ("absolute (inputs of one length)" if fixed_length(model) else
                                  f"relative: bin i of {POSITION_BINS} holds [i / {POSITION_BINS}, (i + 1) / "
                                  f"{POSITION_BINS}) of a sequence") + ", in input order (a backward scan mapped "
                               "back); the median from a histogram of 16 log bins a decade (approximate)"),
            "auto": (f"what the methods' auto activation granularity (methods/granularity.py) chooses from the site's "
                     f"full-precision token maxima before any transform, with its defaults (token_outlier_ratio "
                     f"{AUTO.token_outlier_ratio:g}, token_outlier_share {AUTO.token_outlier_share:g}); MambaQuant "
                     "decides after its transforms (granularity_reasons of its runs)"),
            "transforms": TRANSFORMS_AT,
        },
        "transform_names": TRANSFORM_NAMES,
        "mambaquant_transform": MAMBAQUANT_TRANSFORM,
        "histogram_edges": HISTOGRAM_EDGES.tolist(),
        "sites": {n: site_record(n, sites[n], s, fixed_length(model)) for n, s in statistics.items()},
        "transforms": transform_statistics(model, statistics, config.seed),
    }
    del statistics
    results["sqnr"] = quantization_error(model, batches, config, progress)
    write_atomic_dir(out_dir, lambda staging: write_outputs(results, staging, plots, report), overwrite,
                     kind="analysis", sources=[source])
    return results


def check_full_precision(source, name: str) -> None:
    """Refuse a quantized model, before it is loaded where it is a checkpoint directory: analyze measures what each
    method would do to the full-precision model."""
    from ..loaders import quantized, read_config, resolve_source

    if isinstance(source, torch.nn.Module):
        is_quantized, what = hasattr(source, "quantization_report"), "a quantized model"
    else:
        kind, path = resolve_source(source)
        is_quantized = kind == "path" and (path / "config.json").is_file() and quantized.is_quantized_config(
            read_config(path))
        what = "a quantized checkpoint"
    if is_quantized:
        raise InputError(f"{name} is {what}; analyze takes a full-precision model (the one you quantized)")


def write_outputs(results: dict, directory: Path, plots, report) -> None:
    (directory / "stats.json").write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    figures = plots.write_plots(results, directory / "plots")
    (directory / "summary.md").write_text(report.markdown(results, figures))
    (directory / "index.html").write_text(report.html(results, figures))
