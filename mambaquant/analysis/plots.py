"""The analysis plots, drawn from the results dictionary (what stats.json holds) with matplotlib's object API (Agg,
no display needed). Each returns the file name and a one-line caption."""

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .report import label, site_key

KURTOSIS_KINDS = ("norm", "gate", "out_proj_in", "conv", "h", "C", "hC", "y", "v", "o_proj_in", "down_in",
                  "expert_down_in")


def save(figure: Figure, directory: Path, name: str, caption: str) -> tuple[str, str]:
    figure.savefig(directory / name, dpi=80)
    return f"plots/{name}", caption


def key_sites(results: dict) -> dict[str, dict[int, str]]:
    """Key site (e.g. `ssm.h`) -> layer -> full site name, for the plotted layers: the first, middle and last of the
    layers that have it (in a hybrid, of the layers of its kind)."""
    keys: dict[str, dict[int, str]] = {}
    for name in results["transforms"]:
        keys.setdefault(site_key(name), {})[results["sites"][name]["layer"]] = name
    return {key: {layer: names[layer] for layer in plotted(list(names))} for key, names in keys.items()}


def plotted(layers: list[int]) -> list[int]:
    return [layers[i] for i in sorted({0, len(layers) // 2, len(layers) - 1})]


def layer_title(results: dict, layer: int) -> str:
    return f"layer {layer} ({results['layer_kinds'][layer]})"


def channel_profiles(results, directory, key, names):
    figure = Figure(figsize=(10, 2.3 * len(names) + 0.8), layout="constrained")
    axes = figure.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, (layer, name) in zip(axes, names.items()):
        site = results["sites"][name]
        values = site["channel_absmax"]
        ax.bar(np.arange(len(values)), values, width=1.0, color="tab:blue")
        ax.set_title(f"{layer_title(results, layer)}: max {site['absmax']:.3g}, "
                     f"largest/median channel {site['channel_max_ratio']:.1f}x")
        ax.set_ylabel("|x| max")
    axes[-1].set_xlabel("channel")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"{results['model']}: per-channel |x| max at the {label(key)} ({key})")
    return save(figure, directory, f"profile_{key}.png",
                f"Per-channel |x| max at the {label(key)}, layers {', '.join(map(str, names))}")


def histograms(results, directory, key, names):
    edges = np.array(results["histogram_edges"])
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.subplots()
    for layer, name in names.items():
        site = results["sites"][name]
        counts = np.array(site["histogram"])[1:-1]  # the bins between 1e-8 and 1e8
        ax.stairs(np.maximum(counts, 0.5), edges,
                  label=f"{layer_title(results, layer)}, kurtosis {site['kurtosis']:.3g}")
    occupied = np.flatnonzero(sum(np.array(results["sites"][n]["histogram"])[1:-1] for n in names.values()))
    ax.set_xscale("log")
    if occupied.size:
        ax.set_xlim(edges[max(occupied[0] - 1, 0)], edges[min(occupied[-1] + 2, len(edges) - 1)])
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    ax.set_xlabel("|x|")
    ax.set_ylabel("count (log)")
    ax.legend()
    ax.set_title(f"{results['model']}: histogram of |x| at the {label(key)} ({key})")
    return save(figure, directory, f"histogram_{key}.png", f"Histogram of |x| at the {label(key)} (log counts)")


def transforms(results, directory, key, layer, name):
    """Top: per-channel |x| max over the RMS value; bottom: channel variance over its mean. Both are scale-free, so
    the columns share their axes and a flat profile at 1 is what a per-tensor scale wants. A transform not measured
    at this site (see the transforms definition) leaves its column empty."""
    figure = Figure(figsize=(15, 6), layout="constrained")
    names = results["transform_names"]
    axes = figure.subplots(2, len(names), sharex=True, sharey="row")
    chosen = results["mambaquant_transform"][name.rsplit(".", 1)[1]]
    for column, transform in enumerate(names):
        title = names[transform] + (" (MambaQuant's)" if transform == chosen else "")
        top, bottom = axes[0, column], axes[1, column]
        stats = results["transforms"][name].get(transform)
        if stats is None:
            top.set_title(f"{title}\nnot measured here", fontsize="medium")
            top.axis("off")
            bottom.axis("off")
            continue
        variance = np.array(stats["channel_variance"])
        mean = max(variance.mean(), 1e-30)
        channels = np.arange(len(variance))
        top.bar(channels, np.array(stats["kept_rows_channel_absmax"]) / np.sqrt(mean), width=1.0, color="tab:orange")
        top.set_title(f"{title}\nlargest/median channel max {stats['kept_rows_channel_max_ratio']:.1f}x, "
                      f"crest {stats['crest_factor']:.1f}", fontsize="medium")
        bottom.plot(channels, np.maximum(variance / mean, 1e-6), color="tab:green", linewidth=0.8)
        bottom.axhline(1, color="gray", linestyle="--", linewidth=0.8)
        bottom.set_yscale("log")
        bottom.set_title(f"variance max/min {stats['variance_max_min']:.3g}, CV {stats['variance_cv']:.2f}",
                         fontsize="medium")
        bottom.set_xlabel("channel")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylabel("|x| max / RMS\n(rows of largest norm)")
    axes[1, 0].set_ylabel("channel variance / mean (log)")
    figure.suptitle(f"{results['model']}: {label(key)} ({key}), {layer_title(results, layer)}, before and after "
                    "each transform")
    return save(figure, directory, f"transforms_{key}_layer{layer}.png",
                f"{label(key)}, layer {layer}: per-channel |x| max and variance under each transform")


def variance_spread(results, directory):
    by_key: dict[str, dict[int, dict]] = {}
    for name, stats in results["transforms"].items():
        by_key.setdefault(site_key(name), {})[results["sites"][name]["layer"]] = stats
    columns = min(3, len(by_key))
    rows = -(-len(by_key) // columns)
    figure = Figure(figsize=(4.5 * columns, 3.6 * rows + 0.5), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[len(by_key):]:
        ax.set_visible(False)
    for ax, (key, layers) in zip(axes, by_key.items()):
        for transform, title in results["transform_names"].items():
            measured = {layer: s[transform] for layer, s in layers.items() if transform in s}
            ax.plot(list(measured), [s["variance_max_min"] for s in measured.values()], marker="o", label=title)
        ax.set_yscale("log")
        ax.set_title(label(key))
        ax.set_xlabel("layer")
        ax.set_xticks(list(layers))
        ax.set_ylabel("channel variance max / min (log)")
    axes[0].legend()
    figure.suptitle(f"{results['model']}: spread of the channel variances after each transform, per layer")
    return save(figure, directory, "variance_spread.png", "Channel variance max/min per layer under each transform")


def style(key: str) -> dict:
    """A colour per site kind (past the palette's ten, square markers); the backward branch of a bidirectional block
    and the Mamba-2 half of a parallel mixer dashed."""
    index = KURTOSIS_KINDS.index(key.rpartition(".")[2])
    return {"color": f"C{index % 10}", "marker": "o" if index < 10 else "s",
            "linestyle": "--" if key.startswith(("ssm_b.", "mamba.")) else "-"}


def kurtosis(results, directory):
    figure = Figure(figsize=(10, 4.5), layout="constrained")
    ax = figure.subplots()
    series: dict[str, dict[int, float]] = {}
    for name, site in results["sites"].items():
        if site["layer"] is not None and site["kind"] in KURTOSIS_KINDS:
            series.setdefault(site_key(name), {})[site["layer"]] = site["kurtosis"]
    for key, layers in series.items():
        ax.plot(list(layers), list(layers.values()), label=label(key), **style(key))
    ax.axhline(3, color="gray", linestyle=":", label="normal distribution (3)")
    ax.set_xticks(sorted({layer for layers in series.values() for layer in layers}))
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("kurtosis (Pearson, log)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"{results['model']}: kurtosis per layer at the key sites and along the scan")
    return save(figure, directory, "kurtosis.png", "Kurtosis per layer (Pearson, normal = 3)")


def token_outliers(results, directory):
    """Share of outlier tokens per layer, a panel per ratio k, at the key sites and along the scan."""
    ratios = list(next(iter(results["sites"].values()))["tokens"]["outliers"])
    figure = Figure(figsize=(6 * len(ratios) + 2, 4.5), layout="constrained")
    axes = figure.subplots(1, len(ratios), squeeze=False, sharey=True)[0]
    for ax, k in zip(axes, ratios):
        series: dict[str, dict[int, float]] = {}
        for name, site in results["sites"].items():
            if site["layer"] is not None and site["kind"] in KURTOSIS_KINDS:
                series.setdefault(site_key(name), {})[site["layer"]] = 100 * site["tokens"]["outliers"][k]["share"]
        for key, layers in series.items():
            ax.plot(list(layers), list(layers.values()), label=label(key), **style(key))
        ax.set_xticks(sorted({layer for layers in series.values() for layer in layers}))
        ax.set_xlabel("layer")
        ax.set_title(f"tokens whose max |x| exceeds {k}x the median token max")
    axes[0].set_ylabel("share of tokens (%)")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.suptitle(f"{results['model']}: token-wise outliers per layer at the key sites and along the scan")
    return save(figure, directory, "token_outliers.png", "Share of outlier tokens per layer (token max over the "
                f"median token max above {' and '.join(ratios)})")


def token_positions(results, directory, key, names):
    """Per position: the largest and the median token max over the site's median token max (log), per layer."""
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    ax = figure.subplots()
    ratios = []
    for index, (layer, name) in enumerate(names.items()):
        tokens = results["sites"][name]["tokens"]
        ratios = list(tokens["outliers"])
        bins = len(tokens["position_max"])
        absolute = tokens["positions"] == "absolute"
        x = np.arange(bins) if absolute else (np.arange(bins) + 0.5) * 100 / bins
        median = max(tokens["median_max"], 1e-300)
        share = tokens["outliers"][ratios[-1]]["share"]
        ax.plot(x, np.array(tokens["position_max"]) / median, color=f"C{index}", marker=".",
                label=f"{layer_title(results, layer)}: largest ({100 * share:.2f} % of tokens above {ratios[-1]}x)")
        ax.plot(x, np.array(tokens["position_median_max"]) / median, color=f"C{index}", linestyle=":",
                label=f"{layer_title(results, layer)}: median")
    for k in ratios:
        ax.axhline(float(k), color="gray", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("position" if absolute else "position in the sequence (%)")
    ax.set_ylabel("token max / median token max (log)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"{results['model']}: token max per position at the {label(key)} ({key}); dashed: "
                 f"{' and '.join(ratios)}x")
    return save(figure, directory, f"token_positions_{key}.png",
                f"Token max per position at the {label(key)}, layers {', '.join(map(str, names))}")


def sqnr_layers(results, directory):
    bits = list(next(iter(results["sqnr"].values())))
    figure = Figure(figsize=(6 * len(bits), 4.5), layout="constrained")
    axes = figure.subplots(1, len(bits), squeeze=False)[0]
    for ax, width in zip(axes, bits):
        for method, per_bits in results["sqnr"].items():
            layers = per_bits[width]["layers_db"]
            ax.plot(list(layers), list(layers.values()), marker="o",
                    label=f"{method} (output {per_bits[width]['output_db']:.1f} dB)")
        ax.set_title(width.upper())
        ax.set_xlabel("layer")
        ax.set_ylabel("activation SQNR (dB)")
        ax.legend(fontsize="small")
    figure.suptitle(f"{results['model']}: activation quantization SQNR per layer and method (higher is better)")
    return save(figure, directory, "sqnr_layers.png", "Activation SQNR per layer per method")


def write_plots(results: dict, directory: Path) -> list[tuple[str, str]]:
    """Every plot into `directory`; (relative path, caption) for each, in reading order."""
    directory.mkdir()
    figures = [kurtosis(results, directory), variance_spread(results, directory), token_outliers(results, directory)]
    if results["sqnr"]:
        figures.append(sqnr_layers(results, directory))
    keys = key_sites(results)
    figures += [channel_profiles(results, directory, key, names) for key, names in keys.items()]
    figures += [histograms(results, directory, key, names) for key, names in keys.items()]
    figures += [token_positions(results, directory, key, names) for key, names in keys.items()]
    figures += [transforms(results, directory, key, layer, name)
                for key, names in keys.items() for layer, name in names.items()]
    return figures
