"""The walk that applies a method's recipe (`run_recipe`), in memory or streamed from disk block by block
(`streamed`), for `pipeline.quantize`; `set_backend` and the checks.

The walk goes over the model one block at a time, holding only that block's calibration inputs. For each block, in
this order: the method's function-preserving transforms, each from full-precision statistics of the block as
transformed so far; static activation ranges, the granularity choice and GPTQ Hessians, in full precision; the
block's full-precision outputs (the next block's inputs); then its weights are quantized and its activation
quantizers switched on (after its outputs are taken: nothing downstream is calibrated on quantized values).
(The official MambaQuant code quantized weights on the first forward pass,
before some rotations, and gathered statistics with quantization already on.)
"""

import copy
import dataclasses
from dataclasses import asdict

import torch
from torch import nn

from ..errors import InputError
from ..exporters import llama_cpp, vllm
from ..exporters.rules import summary
from ..progress import progress as progress_of
from ..quant.clipping import SiteSample, activation_clip, weight_clip
from ..quant.gptq import gptq_quantize
from ..quant.linear import BACKENDS, QuantizedEmbedding, QuantizedLinear
from ..quant.quantizer import ActivationQuantizer, quantize_weight
from ..runtime import Mamba2Mixer, MambaLM, Site
from ..runtime.attention import Attention
from ..runtime.moe import ExpertList, experts_as_lists
from ..runtime.zamba import unshare_blocks
from ..transforms.klt import CovarianceObserver
from ..transforms.rotation import append_op
from .config import FULL_PRECISION, KV_CACHE_SITES, MAMBA2_ONLY_METHODS, METHODS, QuantConfig, QuantReport
from .granularity import CHUNKED_SITES, StaticCheck, TokenStatistics, granularity_name, make_quantizer
from .recipes import RECIPES
from .stages import (InMemoryBlocks, Runner, activation_sites, block_activation_sites, block_linears, block_runner,
                     fixed_length, has_mamba2_blocks, head_activation_sites, head_slots, held, linear_slots, parts)

# Static ranges from the 99.99th percentile instead of min-max: Quamba's SSM input and state; for MambaQuant the
# heavy-tailed state h (as the paper's official code does). On training data (never the evaluation split), W8A8
# static: typeseg agreement on its calibration files 97.23 % (min-max) -> 99.83 %, mamba-shakespeare training
# text 1.5890 -> 1.5823 bits per byte.
# Per block kind (the site table): Mamba-2's scan input is its x site. Quamba2 keeps Quamba's percentile at h (here
# every method quantizes the state); on Mamba-2, MambaQuant's scan input x gets one too. Both chosen on held-out
# training text (benchmarks/training_data.py shakespeare2), W8A8 / W4A8 static:
# quamba2 1.6260 / 1.6455 bits per byte with a min-max h -> 1.5881 / 1.6064; mambaquant 1.5885 / 1.6061 -> 1.5873 /
# 1.6055 with x (FP 1.5859).
PERCENTILE_SITES = {"quamba": {"mamba1": ("x_proj_in", "h"), "mamba2": ("x", "h")},
                    "quamba2": {"mamba2": ("x", "h")},
                    "mambaquant": {"mamba1": ("h",), "mamba2": ("x", "h")}}
PERCENTILE_SITES["mambaquant+"] = PERCENTILE_SITES["mambaquant"]


def calibrate_quantizers(sites: list[Site], runner: Runner, config: QuantConfig, fixed_length: bool,
                         report: QuantReport, clusters: dict | None = None) -> list[tuple[Site, ActivationQuantizer]]:
    """A quantizer per site with its granularity and static range, from full-precision statistics; none is
    switched on yet. Sites in `clusters` get static ranges per cluster of channels (the widest of its channels').
    With `clip_search` each range is clipped where that lowers the squared error at the site, and "auto" weighs
    its rule's choice against dynamic per-token ranges by that error, both clipped."""
    clusters = clusters or {}
    auto = config.act_granularity == "auto"
    if auto:
        statistics = {site: TokenStatistics() for site in sites if site not in clusters}
        runner.observe(statistics)
    candidates = {}  # site -> its candidate quantizers, the rule's choice first
    for site in sites:
        percentile = site.kind in PERCENTILE_SITES.get(config.method, {}).get(site.table, ())
        if site in clusters:
            granularities = ["channel"]
        elif auto:
            granularity, reason = statistics[site].decide(config, fixed_length and site.kind not in CHUNKED_SITES)
            report.granularity_reasons[site.name] = reason
            granularities = [granularity] + (["token"] if config.clip_search and granularity != "token" else [])
        else:
            granularities = [config.act_granularity]
        bits = config.activation_bits(site.kind)
        candidates[site] = [make_quantizer(g, config, percentile, bits) for g in granularities]
    searched = {site: SiteSample(any(q.spec.granularity == "position" for q in options))
                for site, options in candidates.items() if config.clip_search and site not in clusters}
    checks = {site: StaticCheck(config, fixed_length and site.kind not in CHUNKED_SITES, searched.get(site))
              for site, options in candidates.items() if site not in clusters and not options[0].spec.dynamic}
    observers = {site: observe_all(*[q.observe for q in options if not q.spec.dynamic], searched.get(site),
                                   *(checks[site].observers(options[0]) if site in checks else ()))
                 for site, options in candidates.items()}
    if any(observers.values()):
        runner.observe({site: observer for site, observer in observers.items() if observer})
    quantizers = []
    for site, options in candidates.items():
        quantizer = options[0]
        if site in clusters:
            quantizer.share_ranges(clusters[site])
            report.granularity_reasons[site.name] = f"static per cluster of channels ({config.method})"
        if site in searched:
            quantizer = clip_and_choose(site, options, searched[site], report)
        if site in checks and not quantizer.spec.dynamic:
            quantizer, line = checks[site].check(quantizer)
            if line:
                report.static_ranges.append(f"{site.name}: {line}")
                reason = report.granularity_reasons.get(site.name)
                report.granularity_reasons[site.name] = (f"{reason}; " if reason else "") + line
        if quantizer.spec.bits != config.a_bits and quantizer.spec.bits == config.activation_bits(site.kind):
            reason = report.granularity_reasons.get(site.name)
            report.granularity_reasons[site.name] = (f"{reason}; " if reason else "") + \
                f"int{quantizer.spec.bits} here, int{config.a_bits} elsewhere (site_bits: mixed precision)"
        quantizers.append((site, quantizer))
    return quantizers


def clip_and_choose(site: Site, options: list[ActivationQuantizer], sample: SiteSample,
                    report: QuantReport) -> ActivationQuantizer:
    """Each candidate clipped to its best ratio on the sample; the one with the least squared error (the first,
    the rule's choice, on a tie), with the choice and the clipping said in the report."""
    scored = []
    for quantizer in options:
        ratio, error, unclipped = activation_clip(quantizer, sample)
        quantizer.spec, quantizer.static_cache = dataclasses.replace(quantizer.spec, clip=ratio), None
        scored.append((error, unclipped, quantizer))
    error, unclipped, chosen = min(scored, key=lambda entry: entry[0])
    if len(options) > 1:
        other = next(entry for entry in scored if entry[2] is not chosen)
        report.granularity_reasons[site.name] = (
            f"{granularity_name(chosen)}: squared error {error / max(other[0], 1e-30):.2f}x "
            f"{granularity_name(other[2])}'s, both clipped (the token-maxima rule: "
            f"{report.granularity_reasons[site.name]})")
    ratio = chosen.spec.clip
    report.clipping[site.name] = (f"clipped to {ratio:.2f} of the range: squared error "
                                  f"{error / max(unclipped, 1e-30):.2f}x the full range's" if ratio != 1 else
                                  "not clipped: the full range has the least squared error")
    return chosen


def observe_all(*observers):
    """One site observer calling each of `observers` that is not None; None if none is."""
    kept = [observer for observer in observers if observer is not None]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else lambda site, x: [observer(site, x) for observer in kept]


@torch.no_grad()
def quantize_linears(slots: list[tuple[nn.Module, str, Site]], runner: Runner, config: QuantConfig,
                     clipped: dict[str, list[torch.Tensor]]) -> None:
    """Replace each linear layer by a `QuantizedLinear` (integer codes and scales), rounded to nearest or by GPTQ,
    with clipping ratios searched per output channel under `clip_search` (gathered in `clipped` by layer name).
    A tied LM head shares its matrix with the embedding, which then reads its rows from the head's codes."""
    needs_moments = config.weight_rounding == "gptq" or config.clip_search
    if needs_moments:
        moments = {}
        for _, _, site in slots:
            moments.setdefault(site, CovarianceObserver())
        runner.observe(moments)
    for owner, name, site in slots:
        linear = getattr(owner, name)
        spec = config.linear_weight_spec(linear)
        second_moment = moments[site].outer / moments[site].count if needs_moments else None
        clip = weight_clip(linear.weight, second_moment, spec) if config.clip_search else None
        if clip is not None:
            clipped.setdefault(name, []).append(clip.flatten())
        if config.weight_rounding == "gptq":
            codes, scale = gptq_quantize(linear.weight, second_moment, spec, clip=clip, act_order=config.act_order)
        else:
            codes, scale = quantize_weight(linear.weight, spec, clip)
        quantized = QuantizedLinear(codes, scale, linear.bias, spec.bits)
        setattr(owner, name, quantized)
        if isinstance(owner, MambaLM) and owner.config.tie_embeddings:
            owner.embedding = QuantizedEmbedding(quantized)


def run_recipe(model: nn.Module, config: QuantConfig, batches: list[torch.Tensor], progress: bool = False,
               blocks=None, copy_model: bool = True) -> tuple[nn.Module, QuantReport]:
    """A quantized copy of `model` (the model itself, transformed in place, without `copy_model`) and the report of
    what was done where. `blocks` reaches the model's blocks (default `InMemoryBlocks`; a streamed walk passes
    blocks read from disk one at a time and written out as each is finished)."""
    if not batches:
        raise InputError("the calibration set is empty; expected at least one batch of training data")
    torch.manual_seed(config.seed)
    if copy_model:
        model = copy.deepcopy(model)
    model.eval()
    experts_as_lists(model)
    unshared = unshare_blocks(model)
    quantized_kinds = {site.kind for site in activation_sites(model, config.scope)}
    config = config.resolve_site_bits(quantized_kinds - {site.kind for _, _, site in linear_slots(model)})
    unknown = sorted(set(config.site_bits) - quantized_kinds)
    if unknown and config.a_bits != FULL_PRECISION:
        raise InputError(f"site_bits: this {type(model).__name__} quantizes no activation site of kind "
                         f"{', '.join(map(repr, unknown))}; its quantized sites are "
                         f"{', '.join(sorted(quantized_kinds))}")
    check_kv_cache(model, config)
    blocks = blocks if blocks is not None else InMemoryBlocks(model)
    report = QuantReport(config=asdict(config))
    if unshared:
        report.weights.append(f"Zamba2's shared attention and MLP blocks unshared: each hybrid layer quantized with "
                              f"its own copy (+{unshared:,} parameters), since a rounding or transform chosen at one "
                              "depth would be wrong at the others")
    if config.method == "fp":
        return model, report
    check_blocks_for(config.method, model)
    check_target(model, config)
    model_transform, block_transform, head_transform = RECIPES[config.method]
    model_transform(model, blocks, batches, config, report)
    quantize_acts, quantize_weights = config.a_bits != FULL_PRECISION, config.w_bits != FULL_PRECISION
    fixed = fixed_length(model)
    clipped = {}  # linear name -> its clipping ratios per channel, block by block
    with torch.no_grad():
        hidden = held(check_finite_activations([model.embed(batch) for batch in batches], "the embedding's output"),
                      config.calib_dtype)
    embedded = hidden if any(layer.reads_embedding for layer in getattr(model, "layers", ())) else None
    bar = progress_of(range(len(blocks)), f"{config.method} w{config.w_bits}a{config.a_bits}", "block", progress)
    for index in bar:
        layer = blocks.load(index)
        runner = block_runner(layer, hidden, embedded)
        expert_lists = route_all_tokens(layer, runner)
        clusters = block_transform(layer, runner, config, report)
        slots = quantized_slots(block_linears(layer), config)
        pending = activation_quantizers(block_activation_sites(layer, config.scope), slots, runner, config, fixed,
                                        report, clusters) if quantize_acts else []
        pending += kv_cache_quantizers(layer, config, report)
        # the next block's inputs, from this block in full precision
        outputs = check_finite_activations(runner.outputs(), f"the output of block {index}")
        if quantize_weights:
            quantize_linears(slots, runner, config, clipped)
        switch_on(pending, slots, report)
        report_routing(expert_lists, f"layers.{index}.", report)
        check_finite(layer, f"layers.{index}.")
        if not config.online_transforms:
            check_engine_runs(layer, config)
        blocks.finish(index)
        hidden = held(outputs, config.calib_dtype)
    head_runner = Runner(model.output, hidden)
    head_transform(model, head_runner, config, report)
    pooled = getattr(model.config, "pooling", "none") != "none"  # the head reads one token: no positions
    slots = quantized_slots(head_slots(model), config, model)
    pending = activation_quantizers(head_activation_sites(model), slots, head_runner, config, fixed and not pooled,
                                    report) if quantize_acts else []
    if quantize_weights:
        quantize_linears(slots, head_runner, config, clipped)
        report.weights += weight_lines(model, config)
        if clipped:
            ratios = {name: torch.cat(values) for name, values in clipped.items()}
            report.weights.append("clipping searched per output channel on the layer's output error: " + ", ".join(
                f"{name} mean ratio {r.mean():.2f} ({100 * (r < 1).float().mean():.0f} % of channels clipped)"
                for name, r in ratios.items()))
    switch_on(pending, slots, report)
    check_finite(model, skip="layers.")
    if not config.online_transforms:
        check_engine_runs(model, config, skip="layers.")
        report.transforms.append(engine_line(config))
    if config.calib_dtype != "float32":
        report.transforms.append(f"calibration activations held in {config.calib_dtype} between blocks (each block "
                                 "computed in float32)")
    return model, report


def route_all_tokens(layer: nn.Module, runner: Runner) -> list[tuple[str, ExpertList]]:
    """Every expert of the block sees every calibration token while the walk gathers its statistics (each token's
    output still comes from its own experts): an expert few tokens reach still gets its Hessian and ranges from
    many. Returns the block's experts by name, with the tokens routed to each counted first (one pass)."""
    lists = [(name, module) for name, module in layer.named_modules() if isinstance(module, ExpertList)]
    if lists:
        for _, experts in lists:
            experts.routed = torch.zeros(len(experts), dtype=torch.long)
        runner.observe({})
        for _, experts in lists:
            experts.route_all = True
    return lists


def report_routing(lists: list[tuple[str, ExpertList]], prefix: str, report: QuantReport) -> None:
    for name, experts in lists:
        counts = experts.routed
        experts.route_all, experts.routed = False, None
        unreached = [str(i) for i in range(len(counts)) if counts[i] == 0]
        report.weights.append(
            f"{prefix}{name}: every expert calibrated on all {int(counts.sum()) // max(1, experts.top_k)} calibration "
            f"tokens (routed to each in use: {int(counts.min())} to {int(counts.max())} tokens"
            + (f"; no token reached expert {', '.join(unreached)}" if unreached else "") + ")")


def engine_line(config: QuantConfig) -> str:
    """The report's line on what an engine target kept."""
    if config.target == vllm.ENGINE:
        inputs = ("inputs in float" if config.a_bits == FULL_PRECISION else
                  f"int8 inputs {'static per tensor' if config.act_granularity == 'tensor' else 'dynamic per token'}")
        four = (f"; int4 weights only where the output width is a multiple of {vllm.W4_OUTPUT_MULTIPLE} (vLLM's 4-bit "
                "kernels), int8 per channel elsewhere") if config.w_bits == 4 else ""
        return (f"target vllm: the transforms fused into the weights, and the online Hadamards at out_proj / down_proj "
                f"inputs (compressed-tensors input transforms); {inputs} at the linears vLLM quantizes (Mamba-2 "
                f"in_proj / out_proj, attention and MLP linears), the head in float{four}; the conv, the scan, its "
                "state and the norms in float32")
    return (f"target {config.target}: only the transforms fused into the weights (llama.cpp runs none at run time); "
            f"weights in {llama_cpp.WEIGHT_TYPES[config.w_bits]} blocks of {llama_cpp.BLOCK} with float16 scales; each "
            f"quantized linear's input quantized as llama.cpp does (int8 per {llama_cpp.BLOCK} values); the conv, the "
            "scan and its state in float32")


def quantized_slots(slots: list[tuple[nn.Module, str, Site]], config: QuantConfig, model: nn.Module | None = None) \
        -> list:
    """The linear layers a run quantizes: every one; for llama.cpp those it holds in Q8_0 / Q4_0 blocks; for vLLM
    all but the head (`model`: the model whose head the slots may hold)."""
    if config.target == llama_cpp.ENGINE:
        return llama_cpp.engine_slots(slots)
    if config.target == vllm.ENGINE:
        head = {id(getattr(owner, name)) for owner, name, _ in head_slots(model)} if model is not None else set()
        return vllm.engine_slots(slots, head)
    return slots


def activation_quantizers(sites: list[Site], slots: list, runner: Runner, config: QuantConfig, fixed: bool,
                          report: QuantReport, clusters: dict | None = None) -> list[tuple[Site, ActivationQuantizer]]:
    """Calibrated quantizers at the stage's activation sites; for llama.cpp its own dynamic quantizer at the input
    of each linear it holds quantized, and nothing elsewhere (it quantizes nothing else)."""
    if config.target == llama_cpp.ENGINE:
        return [(site, llama_cpp.input_quantizer()) for _, _, site in slots]
    if config.target == vllm.ENGINE:  # the inputs of the linears it quantizes, nothing else
        read = {site for _, _, site in slots}
        sites = [site for site in sites if site in read]
    return calibrate_quantizers(sites, runner, config, fixed, report, clusters)


def check_kv_cache(model: nn.Module, config: QuantConfig) -> None:
    if config.kv_bits != FULL_PRECISION and not any(isinstance(part, Attention) for layer in model.layers
                                                    for part in parts(layer)):
        raise InputError(f"kv_bits: this {type(model).__name__} has no attention layer, so no KV cache to quantize; "
                         "expected a hybrid with attention layers, or kv_bits 16")


def kv_cache_quantizers(layer: nn.Module, config: QuantConfig,
                        report: QuantReport) -> list[tuple[Site, ActivationQuantizer]]:
    """The quantizers of the block's KV cache (its attention's `k` and `v` sites) at `kv_bits`, whatever a_bits and
    site_bits say: dynamic (`QuantConfig.kv_cache_spec`), so nothing to calibrate."""
    if config.kv_bits == FULL_PRECISION:
        return []
    pending = []
    for attention in (part for part in parts(layer) if isinstance(part, Attention)):
        for kind in KV_CACHE_SITES:
            site = attention.sites[kind]
            pending.append((site, ActivationQuantizer(config.kv_cache_spec(attention.config.head_dim))))
            report.granularity_reasons[site.name] = (f"the KV cache at int{config.kv_bits} (kv_bits), one range per "
                                                     "position and key/value head")
    return pending


def weight_lines(model: nn.Module, config: QuantConfig) -> list[str]:
    """The report's account of the weights: rounding, width and granularity of each kind of linear layer, and the
    ones left in float."""
    rounding = "GPTQ" if config.weight_rounding == "gptq" else "round-to-nearest"
    head = {id(getattr(owner, name)) for owner, name, _ in head_slots(model)}
    groups = {}  # what a linear got -> the kinds of linear (in_proj, ..., the head) that got it
    for owner, name, _ in linear_slots(model):
        linear = getattr(owner, name)
        if not isinstance(linear, QuantizedLinear):
            got = "float"
        else:
            got = f"group of {linear.in_features // linear.scale.shape[1]}" if linear.scale.dim() == 3 else "channel"
            got = f"int{linear.bits} per {got}"
        kinds = groups.setdefault(got, [])
        kind = "the head" if id(linear) in head else name
        if kind not in kinds:
            kinds.append(kind)
    scales = ", float16 scales" if config.weight_spec().half_scales else ""
    order = " in activation order" if config.act_order else ""
    lines = [f"{rounding}{order} {got}{scales}: {', '.join(k for k in kinds if k != 'the head')} of every block"
             f"{', and the head' if 'the head' in kinds else ''}" for got, kinds in groups.items() if got != "float"]
    lines += [f"kept in float: {', '.join(kinds)}" for got, kinds in groups.items() if got == "float"]
    if config.target == llama_cpp.ENGINE and "float" in groups:
        lines[-1] += f" (input widths not a multiple of {llama_cpp.BLOCK}: llama.cpp's blocks run along the input)"
    return lines


def check_engine_runs(module: nn.Module, config: QuantConfig, skip: str | None = None) -> None:
    """A block (or the rest of the model, `skip`ping the blocks) quantized for an engine holds nothing the engine
    does not execute (a recipe that left something would be a bug)."""
    if config.target == vllm.ENGINE:
        problems = vllm.execution_problems(module, config.w_bits, skip)
    else:
        problems = llama_cpp.execution_problems(module, skip)
    if problems:
        raise InputError(f"method {config.method} left what {config.target} does not execute: "
                         f"{summary(problems)}")


def switch_on(pending: list[tuple[Site, ActivationQuantizer]], slots: list[tuple[nn.Module, str, Site]],
              report: QuantReport) -> None:
    """Put the calibrated activation quantizers in place: an integer linear quantizes its own input, every other
    site gets its quantizer as its last op. Only once a stage's full-precision outputs are taken."""
    consumers = {}
    for owner, name, site in slots:
        consumers.setdefault(site, []).append(getattr(owner, name))
    for site, quantizer in pending:
        linears = consumers.get(site, [])
        if linears and all(isinstance(linear, QuantizedLinear) for linear in linears):
            for number, linear in enumerate(linears):  # each its own copy: the same ranges, saved with each linear
                linear.input_quantizer = quantizer if number == 0 else copy.deepcopy(quantizer)
        else:
            append_op(site, quantizer)
        report.activation_sites[site.name] = quantizer.extra_repr()


def check_target(model: nn.Module, config: QuantConfig) -> None:
    if config.target == vllm.ENGINE:
        problems = vllm.architecture_problems(model)
        if problems:
            raise InputError(f"target vllm: vLLM cannot serve this model quantized: {'; '.join(problems)}")
    if config.target == llama_cpp.ENGINE:
        problems = llama_cpp.architecture_problems(model)
        if problems:
            raise InputError(f"target llama.cpp: llama.cpp cannot run this model: {'; '.join(problems)}")


def methods_for(model: nn.Module, methods=None) -> tuple[str, ...]:
    """The methods asked for, each checked against the model's block kind; None: every method for that kind."""
    if methods is None:
        mamba2 = has_mamba2_blocks(model)
        return tuple(m for m in METHODS if mamba2 or m not in MAMBA2_ONLY_METHODS)
    for method in methods:
        check_blocks_for(method, model)
    return tuple(methods)


def check_blocks_for(method: str, model: nn.Module) -> None:
    """Quamba2's recipe is written for Mamba-2 blocks (its groups are Mamba-2's heads and B/C groups)."""
    if method in MAMBA2_ONLY_METHODS and not any(isinstance(module, Mamba2Mixer) for module in model.modules()):
        raise InputError(f"method quamba2 quantizes Mamba-2 blocks (heads and B/C groups); this "
                         f"{type(model).__name__} has Mamba-1 blocks: use quamba, its Mamba-1 counterpart")


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Run the quantized linear layers as a float32 simulation of their integer arithmetic ("fake") or on int8
    kernels ("int8"): int8 x int8 -> int32 products where the activations are quantized (the same numbers as the
    simulation, bit for bit), the float input split into int8 limbs where only the weights are (the same to
    float32 precision). The other quantization points (conv1d input, h, C) are simulated in both."""
    linears = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    engine = any(linear.input_quantizer is not None and linear.input_quantizer.spec.granularity == "block"
                 for linear in linears)
    check_backend(backend, bool(linears), llama_cpp.ENGINE if engine else "runtime")
    for linear in linears:
        linear.set_backend(backend)
    return model


def check_backend(backend: str, quantized_weights: bool, target: str = "runtime") -> None:
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "int8" and not quantized_weights:
        raise InputError("the int8 backend needs a model with quantized weights (w_bits <= 8)")
    if backend == "int8" and target != "runtime":
        raise InputError(f"a model quantized for {target} runs there (mambaquant export DIR --to gguf); here it runs "
                         "as its exact simulation: expected --backend fake")


def check_finite_activations(tensors: list[torch.Tensor], where: str) -> list[torch.Tensor]:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise InputError(f"calibration produced NaN or Inf at {where}; expected finite activations: check the "
                         "model's weights and the calibration data")
    return tensors


def check_finite(module: nn.Module, prefix: str = "", skip: str | None = None) -> None:
    """Every floating-point tensor of `module` (named with `prefix`; those under `skip` left out) must be finite."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if skip is not None and name.startswith(skip):
            continue
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"quantization produced NaN or Inf in {prefix}{name}; check the calibration data")
