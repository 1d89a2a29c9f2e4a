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
from ..runtime import Mamba2Mixer
from ..transforms.klt import CovarianceObserver, klt_hadamard
from ..transforms.rotation import Rotate, branches, random_hadamard
from ..transforms.smoothing import smoothing_scales, state_smoothing_scales

KEY_SITES = ("norm", "gate", "out_proj_in", "h", "C")  # in_proj input, gate, out_proj input, h*C operands
TRANSFORMS = ("none", "hadamard", "klt_hadamard", "smooth_hadamard")
TRANSFORM_NAMES = {"none": "none", "hadamard": "Hadamard", "klt_hadamard": "KLT + Hadamard",
                   "smooth_hadamard": "smoothing + Hadamard"}
# What `mambaquant` (methods/mambaquant.py) applies at each key site
MAMBAQUANT_TRANSFORM = {"norm": "klt_hadamard", "gate": "smooth_hadamard", "out_proj_in": "smooth_hadamard",
                        "h": "smooth_hadamard", "C": "smooth_hadamard"}
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


def transform(kind: str, name: str, layer, statistics: dict[str, SiteStatistics], residual_covariance: torch.Tensor,
              seed: int, alpha: float = 0.5) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """For one key site: transform name -> (channel scale or None, rotation or None).

    Hadamard: QuaRot's randomised one on the residual stream (norm), the online Hadamard at out_proj's input (gate,
    out_proj_in), a randomised one on the state dimension (h, C). KLT + Hadamard: from this site's covariance, except
    on the residual stream, which MambaQuant rotates once for all blocks (covariance pooled over the layers).
    Smoothing: SmoothQuant's scale against the consumer weight (in_proj; out_proj, the S-SiLU for the gate); h / s and
    C s for the state (`state_smoothing_scales`)."""
    site = statistics[name]
    n = len(site.channel_absmax)
    prefix = name.rsplit(".", 1)[0]
    if kind == "norm":
        hadamard = random_hadamard(n, seed)
        covariance = residual_covariance
        scale = 1 / smoothing_scales(site.channel_absmax.float(), layer.mixer.in_proj.weight, alpha)
    elif kind in ("gate", "out_proj_in"):
        hadamard = Rotate(n).as_matrix()
        covariance = site.covariance.covariance()
        out_proj_in = statistics[f"{prefix}.out_proj_in"].channel_absmax.float()
        scale = 1 / smoothing_scales(out_proj_in, layer.mixer.out_proj.weight, alpha)
    else:  # h, C
        h_absmax = statistics[f"{prefix}.h"].channel_absmax.float()
        c_absmax = statistics[f"{prefix}.C"].channel_absmax.float()
        groups = len(c_absmax) // len(h_absmax)  # Mamba-2's C holds n_groups blocks of d_state channels
        hadamard = torch.block_diag(*[random_hadamard(len(h_absmax), seed + 2)] * (n // len(h_absmax)))
        covariance = site.covariance.covariance()
        if kind == "h":  # h pools every group: C's range per state channel is the largest over the groups
            scale = 1 / state_smoothing_scales(h_absmax, c_absmax.view(groups, -1).amax(0), alpha)
        else:
            scale = state_smoothing_scales(h_absmax.repeat(groups), c_absmax, alpha)
    return {"none": (None, None), "hadamard": (None, hadamard), "klt_hadamard": (None, klt_hadamard(covariance)),
            "smooth_hadamard": (scale, hadamard)}


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
    key = {name: statistics[name] for name in key_site_names(model)}
    residual = [s.covariance for name, s in key.items() if name.endswith(".norm")]
    residual_covariance = CovarianceObserver.pooled(residual).covariance() if residual else None
    results = {}
    for name, site in key.items():
        kind, layer = name.rsplit(".", 1)[1], model.layers[int(name.split(".")[1])]
        results[name] = {t: transformed_channels(site, scale, rotation) for t, (scale, rotation)
                         in transform(kind, name, layer, statistics, residual_covariance, seed).items()}
    return results


def key_site_names(model) -> list[str]:
    """The key sites of every layer (both branches of a bidirectional block; a Mamba-2 block's gate is left out:
    its smoothing acts after the gated norm, at out_proj_in)."""
    names = []
    for layer in model.layers:
        mixer = layer.mixer
        if isinstance(mixer, Mamba2Mixer):
            names += [layer.sites["norm"].name] + [mixer.sites[kind].name for kind in ("out_proj_in", "h", "C")]
            continue
        names += [layer.sites["norm"].name, mixer.sites["gate"].name, mixer.sites["out_proj_in"].name]
        for ssm in branches(mixer):
            names += [ssm.sites["h"].name, ssm.sites["C"].name]
    return names
