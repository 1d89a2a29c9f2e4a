"""Streaming statistics of the tensors at a model's sites, and what each transform does to their channels.

Channel = the last dimension of a site's tensor, everywhere (as the library's observers read it): d_model or d_inner
for the (B, L, C) sites, the state dimension N for the scan sites dA, dBu and h (B, T, E, N), which is the dimension
MambaQuant's h*C smoothing and Hadamard act on. A row is one vector along that dimension (a token, or a (token, E)
pair at the scan sites).

Every value enters the per-channel |x| maxima, the moments and the |x| histogram (kurtosis and tails are decided by
rare values: a sample of rows underestimated the kurtosis of h by 40 %). The covariance at the key sites comes from at
most `covariance_rows` rows of each tensor, drawn uniformly with a seeded generator (a 1536-wide covariance of every
row would dominate the run). Memory is a few vectors per site, plus, at the key sites, the C x C covariance and the
`kept_rows` rows of largest norm (for max profiles after a rotation: a row left out has norm, hence |value| in any
rotated channel, at most the smallest kept norm).

Token-wise outliers (`TokenMaxima`): a token is one (sample, position); its max is the largest |x| over every other
dimension of the site's tensor, as the methods' `auto` granularity reads it (`TokenStatistics`, which runs beside it
at the quantized sites). Every token enters a count over (position, log token max) bins: the median token max, the
share of tokens above k times it and where those tokens sit come from it, approximately (log-uniform within a bin of
a factor 10^(1/16) = 1.155). Counts are float32: exact to 2^24 tokens per (position, bin).
"""

from dataclasses import dataclass
from math import comb, log

import torch

from ..methods.config import QuantConfig
from ..methods.granularity import CHUNKED_SITES, TokenStatistics
from ..methods.stages import parts
from ..runtime import Mamba2Mixer, MambaMixer
from ..runtime.attention import Attention
from ..runtime.mlp import MLP
from ..runtime.moe import MoE
from ..transforms.klt import CovarianceObserver, klt_hadamard
from ..transforms.rotation import Rotate, branches, online_hadamard, random_hadamard
from ..transforms.smoothing import (down_input_smoothable, per_query_head, readers_weight, smoothing_scales,
                                    state_smoothing_scales, value_smoothing_scales)

# block input; Mamba: gate, out_proj input, h*C operands; attention: values, o_proj input; MLPs, experts: down input
KEY_SITES = ("norm", "gate", "out_proj_in", "h", "C", "v", "o_proj_in", "down_in", "expert_down_in")
TRANSFORMS = ("none", "hadamard", "klt_hadamard", "smooth_hadamard")
TRANSFORM_NAMES = {"none": "none", "hadamard": "Hadamard", "klt_hadamard": "KLT + Hadamard",
                   "smooth_hadamard": "smoothing + Hadamard"}
TRANSFORMS_AT = (
    "x -> (x * scale) R at each key site, as the methods apply them there. Hadamard: QuaRot's randomised one on the "
    "residual stream (norm, the block input), the online one at out_proj's input (gate, out_proj_in), a randomised "
    "one on the state dimension (h, C), one per head, the same for every head (v, o_proj_in), the online one at "
    "down_proj's input (down_in, expert_down_in). KLT + Hadamard: from the site's covariance (on the residual "
    "stream pooled over the blocks, as MambaQuant rotates it once). Smoothing + Hadamard: SmoothQuant's scale "
    "against the weight that takes it back first: the block norm's against every layer reading it, out_proj's "
    "input against out_proj, h / s and C s, v / s against o_proj (each query head's output / the s of its values), "
    "down_proj's input against down_proj (in up_proj's rows); it has no column at expert_down_in, one site for all "
    "experts where each expert has its own scale, nor at an MLP whose activation passes no scale (ungated, not "
    "squared ReLU), where MambaQuant applies the Hadamard alone")
# What `mambaquant` (methods/mambaquant.py) applies at each key site (at expert_down_in: per expert, not measured)
MAMBAQUANT_TRANSFORM = {"norm": "klt_hadamard", **{kind: "smooth_hadamard" for kind in KEY_SITES[1:]}}
HISTOGRAM_EDGES = torch.logspace(-8, 8, 65, dtype=torch.float64)  # |x| bins, 4 a decade; below and above: 2 more
TOKEN_EDGES = torch.logspace(-8, 8, 257, dtype=torch.float64)  # token max bins, 16 a decade; below, above: 2 more
TOKEN_OUTLIER_RATIOS = (5.0, QuantConfig.token_outlier_ratio)  # k; the second (10) is what `auto` decides from
POSITION_BINS = 32  # relative positions of variable-length inputs: bin i holds [i / 32, (i + 1) / 32) of a sequence
TOP_POSITIONS = 3
TOKEN = ("one (sample, position); its max is the largest |x| over every other dimension of the site's tensor (the "
         "channels; (E, N) or (H, P, N) at the scan sites), as the methods' auto granularity reads it")
# What the methods' "auto" granularity is asked here: its defaults (token_outlier_ratio, token_outlier_share)
AUTO = QuantConfig(method="mambaquant", w_bits=8, a_bits=8, act_granularity="auto")
KURTOSIS = "Pearson kurtosis (fourth central moment / variance^2; 3 for a normal distribution) of all values pooled"


@dataclass
class SketchConfig:
    covariance_rows: int = 1024  # rows of each tensor entering the covariance
    kept_rows: int = 1024  # rows of largest norm kept at the key sites


def rounded(values: torch.Tensor) -> list[float]:
    """Per-channel values for the JSON: 5 significant digits."""
    return [float(f"{v:.5g}") for v in values.tolist()]


def row_chunks(flat: torch.Tensor, elements: int = 1 << 22) -> tuple[torch.Tensor, ...]:
    """Pieces of a (rows, channels) tensor of about `elements` values: temporaries stay small at the logits."""
    return flat.split(max(1, elements // flat.shape[1]))


def sampled_rows(flat: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """All rows, or `limit` drawn uniformly (with replacement). Not a stride: at the scan sites the rows run over
    (token, d_inner channel), and a stride would keep visiting the same few d_inner channels."""
    if flat.shape[0] <= limit:
        return flat
    return flat[torch.randint(flat.shape[0], (limit,), generator=generator)]


class SequenceClock:
    """The input position of each time step a site sees in a forward pass (`restart` before each one). The scan
    sites see the sequence in chunks: each keeps its next step, and the length is that of the last site that saw all
    of it. A backward branch (`ssm_b`) scans the reversed sequence; so does a shared bidirectional scan's second pass
    (steps L to 2L - 1 at its chunked sites): their positions are mapped back to input order."""

    def __init__(self):
        self.length, self.offsets = 0, {}

    def restart(self) -> None:
        self.offsets.clear()

    def positions(self, site, steps: int) -> torch.Tensor:
        start = 0
        if site.kind in CHUNKED_SITES and self.length:
            start = self.offsets.get(site.name, 0)
            self.offsets[site.name] = start + steps
        else:
            self.length = steps
        t = torch.arange(start, start + steps)
        backward = (t >= self.length) ^ ("ssm_b" in site.name.split("."))
        t = t % self.length
        return torch.where(backward, self.length - 1 - t, t)


def log_bins() -> tuple[torch.Tensor, torch.Tensor]:
    """log lower and upper edges of the `TOKEN_EDGES` bins (the outer two as one more bin of the same width)."""
    edges = TOKEN_EDGES.log()
    step = edges[1] - edges[0]
    return torch.cat([edges[:1] - step, edges]), torch.cat([edges, edges[-1:] + step])


def histogram_quantile(counts: torch.Tensor, q: float) -> float:
    """The q-quantile of the values binned in `counts` (`TOKEN_EDGES`), log-uniform within its bin."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    cumulative = counts.cumsum(0)
    j = int(torch.searchsorted(cumulative, q * total))
    lower, upper = log_bins()
    fraction = (q * total - (cumulative[j - 1] if j else 0)) / counts[j]
    return (lower[j] + fraction * (upper[j] - lower[j])).exp().item()


def counts_above(counts: torch.Tensor, threshold: float) -> torch.Tensor:
    """The binned values above `threshold`, over the last dimension of `counts` (log-uniform within a bin)."""
    lower, upper = log_bins()
    return counts @ ((upper - log(max(threshold, 1e-300))) / (upper - lower)).clamp(0, 1)


class TokenMaxima:
    """Token maxima over (position, log token max) bins; the position absolute (fixed-length inputs) or one of
    `POSITION_BINS` relative bins of the sequence. Also the largest token max per position, exactly."""

    def __init__(self, absolute: bool, clock: SequenceClock):
        self.absolute, self.clock = absolute, clock
        self.counts = torch.zeros(0 if absolute else POSITION_BINS, len(TOKEN_EDGES) + 1)
        self.position_max = torch.zeros(len(self.counts), dtype=torch.float64)
        self.timed = False  # a (B, C) site (a vision model's logits) has one token per sample and no positions

    def __call__(self, site, x: torch.Tensor, row_max: torch.Tensor) -> None:
        """`row_max`: the largest |x| of each row of x (..., C), for every row."""
        timed = x.dim() > 2
        token_max = row_max.double().view(x.shape[0], x.shape[1] if timed else 1, -1).amax(-1)
        index = torch.zeros(1, dtype=torch.long)
        if timed:
            self.timed = True
            index = self.clock.positions(site, x.shape[1])
            index = index if self.absolute else index * POSITION_BINS // self.clock.length
        if len(self.counts) <= index.max():
            grown = int(index.max()) + 1 - len(self.counts)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grown, self.counts.shape[1])])
            self.position_max = torch.cat([self.position_max, self.position_max.new_zeros(grown)])
        bins = torch.bucketize(token_max, TOKEN_EDGES) + index * self.counts.shape[1]
        self.counts.view(-1).add_(torch.bincount(bins.flatten(), minlength=self.counts.numel()).float())
        self.position_max.scatter_reduce_(0, index, token_max.amax(0), "amax")

    def summary(self) -> dict:
        counts = self.counts.double()
        tokens = counts.sum(1)
        median = histogram_quantile(counts.sum(0), 0.5)
        result = {"tokens": int(tokens.sum()), "median_max": median,
                  "largest_max_ratio": self.position_max.max().item() / max(median, 1e-300)}
        if self.timed:
            result |= {"positions": "absolute" if self.absolute else f"relative, {POSITION_BINS} bins",
                       "position_tokens": [int(n) for n in tokens],
                       "position_max": rounded(self.position_max),
                       "position_median_max": [float(f"{histogram_quantile(row, 0.5):.5g}") for row in counts]}
        result["outliers"] = {f"{k:g}": self.outliers(counts, k * median) for k in TOKEN_OUTLIER_RATIOS}
        return result

    def outliers(self, counts: torch.Tensor, threshold: float) -> dict:
        tokens = counts.sum(1)
        above = counts_above(counts, threshold)
        result = {"share": (above.sum() / tokens.sum()).item()}
        if self.timed:
            share = above / tokens.clamp(min=1)
            result["position_share"] = rounded(share)
            top = above.argsort(descending=True)[:TOP_POSITIONS]
            result["top_positions"] = [{"position": int(p), "share": float(f"{share[p]:.5g}"),
                                        "of_outliers": float(f"{above[p] / above.sum():.5g}")}
                                       for p in top if above[p] > 0]
        return result


class SiteStatistics:
    """A site observer: per-channel |x| max, per-channel power sums about a shift (float64), an |x| histogram, the
    token maxima (`TokenMaxima`); at key sites also the covariance (`CovarianceObserver`) and the rows of largest
    norm; at quantized sites (`auto`) the methods' own `TokenStatistics`."""

    def __init__(self, sketch: SketchConfig, key: bool = False, auto: bool = False, absolute: bool = False,
                 clock: SequenceClock | None = None):
        self.sketch = sketch
        self.tokens = TokenMaxima(absolute, clock or SequenceClock())
        self.auto = TokenStatistics() if auto else None
        self.rows = 0
        self.channel_absmax = self.shift = self.sums = None
        self.histogram = torch.zeros(len(HISTOGRAM_EDGES) + 1, dtype=torch.float64)
        self.covariance = CovarianceObserver() if key else None
        self.top_rows = None
        self.generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def __call__(self, site, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        if self.shift is None:  # moments about the first rows' channel means: no cancellation for offset data
            self.shift = row_chunks(flat)[0].double().mean(0)
            self.sums = torch.zeros(5, flat.shape[1], dtype=torch.float64)
        channel_max, row_max = [], []
        for part in row_chunks(flat):
            magnitude = part.abs()
            channel_max.append(magnitude.amax(0))
            row_max.append(magnitude.amax(1))
            centred = part.double() - self.shift
            power = torch.ones_like(centred)
            for k in range(5):
                self.sums[k] += power.sum(0)
                power = power * centred
            bins = torch.bucketize(magnitude.flatten().double(), HISTOGRAM_EDGES)
            self.histogram += torch.bincount(bins, minlength=len(self.histogram)).double()
        absmax = torch.stack(channel_max).amax(0).double()
        self.channel_absmax = absmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, absmax)
        self.tokens(site, x, torch.cat(row_max))
        if self.auto is not None:
            self.auto(site, x)
        self.rows += flat.shape[0]
        if self.covariance is not None:
            self.covariance(site, sampled_rows(flat, self.sketch.covariance_rows, self.generator))
            candidates = flat.float()
            if candidates.shape[0] > self.sketch.kept_rows:
                candidates = candidates[candidates.norm(dim=1).topk(self.sketch.kept_rows).indices]
            rows = candidates if self.top_rows is None else torch.cat([self.top_rows, candidates])
            if rows.shape[0] > self.sketch.kept_rows:
                rows = rows[rows.norm(dim=1).topk(self.sketch.kept_rows).indices]
            self.top_rows = rows

    def central_moment(self, order: int, center: torch.Tensor) -> torch.Tensor:
        """Per channel E[(x - center)^order], from the power sums about the shift."""
        d = self.shift - center
        return sum(comb(order, k) * self.sums[k] / self.rows * d ** (order - k) for k in range(order + 1))

    def mean(self) -> torch.Tensor:
        return self.shift + self.sums[1] / self.rows

    def variance(self) -> torch.Tensor:
        return self.central_moment(2, self.mean())

    def kurtosis(self) -> float:
        pooled = self.mean().mean()
        m2, m4 = self.central_moment(2, pooled).mean(), self.central_moment(4, pooled).mean()
        return (m4 / m2.clamp(min=1e-300) ** 2).item()

    def summary(self) -> dict:
        variance = self.variance()
        channel_absmax = self.channel_absmax
        return {
            "channels": len(channel_absmax),
            "rows": self.rows,
            "absmax": channel_absmax.max().item(),
            "channel_absmax": rounded(channel_absmax),
            "channel_max_ratio": spread_ratio(channel_absmax, median=True),
            "kurtosis": self.kurtosis(),
            "std": variance.mean().sqrt().item(),
            "variance_max_min": spread_ratio(variance),
            "variance_cv": coefficient_of_variation(variance),
            "histogram": self.histogram.tolist(),
            "tokens": self.tokens.summary(),
        }

    def auto_choice(self, fixed_length: bool) -> dict:
        """What the methods' `auto` granularity chooses from this site's full-precision, untransformed token maxima
        (`fixed_length` as the walk passes it), with its reason: the numbers it decided from."""
        granularity, reason = self.auto.decide(AUTO, fixed_length)
        return {"granularity": granularity, "reason": reason}


def spread_ratio(values: torch.Tensor, median: bool = False) -> float:
    """max / min (or max / median) of non-negative per-channel values; the floor keeps dead channels finite."""
    bottom = values.median() if median else values.min()
    return (values.max() / bottom.clamp(min=1e-12)).item()


def coefficient_of_variation(values: torch.Tensor) -> float:
    return (values.std(unbiased=False) / values.mean().clamp(min=1e-300)).item()


# ---------------------------------------------------------------------------------------------------------------
# Transforms at the key sites: x -> (x * scale) R, as the methods apply them
# ---------------------------------------------------------------------------------------------------------------


def transform(name: str, owner, statistics: dict[str, SiteStatistics], residual_covariance: torch.Tensor,
              seed: int, alpha: float = 0.5) -> dict[str, tuple]:
    """For one key site: transform name -> (channel scale or None, rotation or None); "smooth_hadamard" left out where
    no smoothing can be measured there (`SMOOTHED_ROTATIONS`). KLT + Hadamard comes from this site's covariance,
    except on the residual stream, which MambaQuant rotates once for all blocks (covariance pooled over the
    layers)."""
    kind = name.rsplit(".", 1)[1]
    scale, hadamard = SMOOTHED_ROTATIONS[kind](name, owner, statistics, seed, alpha)
    covariance = residual_covariance if kind == "norm" else statistics[name].covariance.covariance()
    transforms = {"none": (None, None), "hadamard": (None, hadamard), "klt_hadamard": (None, klt_hadamard(covariance))}
    if scale is not None:
        transforms["smooth_hadamard"] = (scale, hadamard)
    return transforms


def residual_stream(name: str, block, statistics: dict[str, SiteStatistics], seed: int, alpha: float):
    """QuaRot's randomised Hadamard; SmoothQuant's scale in the block norm against every layer reading it."""
    absmax = statistics[name].channel_absmax.float()
    return 1 / smoothing_scales(absmax, residual_readers_weight(block), alpha), random_hadamard(len(absmax), seed)


def residual_readers_weight(block) -> torch.Tensor:
    """The weights reading the block norm's output, stacked by rows (`Block.input_layers`); a mixture of experts'
    experts as the full-precision model holds them, stacked (n_experts, d_ff, d_model), their rows one after the
    other."""
    moe = block.mixer
    if not isinstance(moe, MoE):
        return readers_weight(block.input_layers())
    stacked = (moe.experts.gate_proj, moe.experts.up_proj)
    experts = [moe.fc1_latent_proj.weight] if moe.fc1_latent_proj is not None else \
        [weight.flatten(0, 1) for weight in stacked if weight is not None]
    shared = moe.shared_expert.input_layers() if moe.shared_expert is not None else []
    return torch.cat([moe.router.weight, *experts, *(layer.weight for layer in shared)])


def mamba_output(name: str, mixer, statistics: dict[str, SiteStatistics], seed: int, alpha: float):
    """The gate and out_proj's input: the online Hadamard there; SmoothQuant's scale against out_proj (the S-SiLU
    for the gate, the gated norm's weight on Mamba-2)."""
    out_proj_in = statistics[mixer.sites["out_proj_in"].name].channel_absmax.float()
    return 1 / smoothing_scales(out_proj_in, mixer.out_proj.weight, alpha), Rotate(len(out_proj_in)).as_matrix()


def scan_state(name: str, mixer, statistics: dict[str, SiteStatistics], seed: int, alpha: float):
    """h and C: a randomised Hadamard on the state dimension; h / s and C s (`state_smoothing_scales`)."""
    prefix, kind = name.rsplit(".", 1)
    h_absmax = statistics[f"{prefix}.h"].channel_absmax.float()
    c_absmax = statistics[f"{prefix}.C"].channel_absmax.float()
    groups = len(c_absmax) // len(h_absmax)  # Mamba-2's C holds n_groups blocks of d_state channels
    n = len(statistics[name].channel_absmax)
    hadamard = torch.block_diag(*[random_hadamard(len(h_absmax), seed + 2)] * (n // len(h_absmax)))
    if kind == "h":  # h pools every group: C's range per state channel is the largest over the groups
        return 1 / state_smoothing_scales(h_absmax, c_absmax.view(groups, -1).amax(0), alpha), hadamard
    return state_smoothing_scales(h_absmax.repeat(groups), c_absmax, alpha), hadamard


def attention_heads(name: str, attention, statistics: dict[str, SiteStatistics], seed: int, alpha: float):
    """v and o_proj's input: QuaRot's randomised Hadamard per head (`rotate_heads`, the same for every head); the
    smoothing between v and o_proj (`value_smoothing_scales`: v / s per key/value channel, each query head's output
    / the s of the values it reads)."""
    c = attention.config
    o_proj_in = statistics[attention.sites["o_proj_in"].name].channel_absmax.float()
    s = value_smoothing_scales(attention, o_proj_in, alpha)
    values = name == attention.sites["v"].name
    heads = c.n_kv_heads if values else c.n_heads
    hadamard = torch.block_diag(*[random_hadamard(c.head_dim, seed + 3)] * heads)
    return 1 / (s if values else per_query_head(attention, s)), hadamard


def mlp_inner(name: str, mlp, statistics: dict[str, SiteStatistics], seed: int, alpha: float):
    """An MLP's down_proj input: the online Hadamard there (`rotate_down_input`); SmoothQuant's scale against
    down_proj, in up_proj's rows, none where the activation passes no scale (`down_input_smoothable`)."""
    down_in = statistics[name].channel_absmax.float()
    hadamard = online_hadamard(len(down_in), seed + 4).as_matrix()
    if not down_input_smoothable(mlp):
        return None, hadamard
    return 1 / smoothing_scales(down_in, mlp.down_proj.weight, alpha), hadamard


def experts_inner(name: str, moe, statistics: dict[str, SiteStatistics], seed: int, alpha: float):
    """The experts' down_proj input, one site for all of them: the online Hadamard, the same in every expert; no
    smoothing: each expert's scale comes from its own range and weight, which this pooled site does not separate."""
    return None, online_hadamard(len(statistics[name].channel_absmax), seed + 4).as_matrix()


# Key site kind -> (channel scale or None, the Hadamard), as the methods apply them there (x -> (x * scale) R)
SMOOTHED_ROTATIONS = {"norm": residual_stream, "gate": mamba_output, "out_proj_in": mamba_output, "h": scan_state,
                      "C": scan_state, "v": attention_heads, "o_proj_in": attention_heads, "down_in": mlp_inner,
                      "expert_down_in": experts_inner}


def transformed_channels(site: SiteStatistics, scale: torch.Tensor | None, rotation: torch.Tensor | None) -> dict:
    """Per-channel variance after x -> (x * scale) R, exactly diag(R^T D S D R) from the covariance S (D = diag(scale)),
    the per-channel |x| max of the kept rows after it, and the crest factor: their largest |x| over the RMS value
    (the square root of the mean channel variance), what a per-tensor scale pays for."""
    covariance = site.covariance.covariance()
    rows = site.top_rows
    if scale is not None:
        covariance = covariance * torch.outer(scale, scale).double()
        rows = rows * scale
    if rotation is not None:
        rotation = rotation.double()
        variance = ((covariance @ rotation) * rotation).sum(0)
        rows = rows @ rotation.float()
    else:
        variance = covariance.diagonal()
    variance = variance.clamp(min=0)
    kept_max = rows.abs().amax(0)
    return {"variance_max_min": spread_ratio(variance), "variance_cv": coefficient_of_variation(variance),
            "crest_factor": (kept_max.max() / variance.mean().sqrt().clamp(min=1e-30)).item(),
            "channel_variance": rounded(variance), "kept_rows_channel_absmax": rounded(kept_max),
            "kept_rows_channel_max_ratio": spread_ratio(kept_max, median=True)}


def transform_statistics(model, statistics: dict[str, SiteStatistics], seed: int) -> dict:
    """Key site name -> transform -> the channel statistics after it."""
    owners = key_sites(model)
    residual = [statistics[name].covariance for name in owners if name.endswith(".norm")]
    residual_covariance = CovarianceObserver.pooled(residual).covariance() if residual else None
    results = {}
    for name, owner in owners.items():
        transforms = transform(name, owner, statistics, residual_covariance, seed)
        results[name] = {t: transformed_channels(statistics[name], scale, rotation)
                         for t, (scale, rotation) in transforms.items()}
    return results


def key_sites(model) -> dict:
    """Key site name -> the layer it belongs to: every block's norm (its block), then per layer of the block
    (`parts`) the sites of `part_key_sites`."""
    sites = {}
    for block in model.layers:
        sites[block.sites["norm"].name] = block
        for part in parts(block):
            sites |= part_key_sites(part)
    return sites


def part_key_sites(part) -> dict:
    """A Mamba-1 mixer's gate, out_proj input and both branches' h and C; a Mamba-2 mixer's out_proj input, h and C
    (its gate is left out: its smoothing acts after the gated norm, at out_proj_in); attention's v and o_proj input;
    an MLP's down_proj input (its input is the block norm's tensor); a mixture of experts' experts' down_proj input
    (one site for all experts, stacked in the full-precision model) and its shared expert's."""
    if isinstance(part, MambaMixer):
        names = [part.sites[kind].name for kind in ("gate", "out_proj_in")]
        names += [ssm.sites[kind].name for ssm in branches(part) for kind in ("h", "C")]
    elif isinstance(part, Mamba2Mixer):
        names = [part.sites[kind].name for kind in ("out_proj_in", "h", "C")]
    elif isinstance(part, Attention):
        names = [part.sites[kind].name for kind in ("v", "o_proj_in")]
    elif isinstance(part, MLP):
        names = [part.sites["down_in"].name]
    else:
        shared = part_key_sites(part.shared_expert) if part.shared_expert is not None else {}
        return {part.experts.sites["expert_down_in"].name: part, **shared}
    return dict.fromkeys(names, part)


def key_site_names(model) -> list[str]:
    return list(key_sites(model))
