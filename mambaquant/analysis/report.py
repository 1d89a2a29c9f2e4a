"""summary.md and index.html: the same tables, in Markdown and in static HTML beside the plots."""

from html import escape

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows
SITE_LABELS = {"norm": "normed block input", "gate": "gate SiLU(z)", "out_proj_in": "out_proj input",
               "conv": "scan input u", "h": "state h (h*C operand)", "C": "C (h*C operand)", "hC": "scan output h*C",
               "y": "scan output y", "v": "attention values v", "o_proj_in": "attention o_proj input",
               "down_in": "MLP down_proj input", "expert_down_in": "experts' down_proj input (all experts)"}
BRANCHES = {"ssm_b": "backward branch", "shared_expert": "shared expert", "mamba": "parallel mixer",
            "attention": "parallel mixer"}  # the last two: Falcon-H1's Mamba-2 and attention side by side


def site_key(name: str) -> str:
    """`layers.3.mixer.ssm_b.h` -> `ssm_b.h`; `layers.3.norm` -> `norm`."""
    return ".".join(p for p in name.split(".")[2:] if p != "mixer") or name


def label(key: str) -> str:
    branch, _, kind = key.rpartition(".")
    text = SITE_LABELS.get(kind, kind)
    return f"{text}, {BRANCHES[branch]}" if branch in BRANCHES else text


def block_kind(results: dict, name: str) -> str:
    """The kinds of layer in the block of a site (`layer_kinds`)."""
    return results["layer_kinds"][results["sites"][name]["layer"]]


def number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def percent(share: float) -> str:
    return f"{100 * share:.2f} %"


def position_label(tokens: dict, position: int) -> str:
    """An absolute position, or a relative bin as its part of the sequence."""
    if tokens["positions"] == "absolute":
        return str(position)
    bins = len(tokens["position_tokens"])
    return f"{100 * position / bins:.0f}-{100 * (position + 1) / bins:.0f} %"


def where(tokens: dict, k: str) -> str:
    """The positions holding most of the tokens above k x the median, each with the share of its tokens above."""
    top = tokens["outliers"][k].get("top_positions", [])
    return ", ".join(f"{position_label(tokens, p['position'])} ({percent(p['share'])})" for p in top) or "-"


def site_row(name: str, site: dict) -> list[str]:
    tokens = site["tokens"]
    ratios = list(tokens["outliers"])
    return [name, str(site["channels"]), number(site["absmax"]), number(site["channel_max_ratio"]),
            number(site["kurtosis"]), number(site["variance_max_min"]), f"{site['variance_cv']:.2f}",
            number(tokens["largest_max_ratio"]), " / ".join(percent(tokens["outliers"][k]["share"]) for k in ratios),
            where(tokens, ratios[-1])]


def site_header(results: dict) -> list[str]:
    ratios = list(next(iter(results["sites"].values()))["tokens"]["outliers"])
    return ["site", "channels", "abs max", "channel max / median", "kurtosis", "variance max / min", "variance CV",
            "token max largest / median", f"tokens > {' / '.join(ratios)}x median token max",
            f"where the > {ratios[-1]}x tokens sit (share of that position's tokens)"]


def auto_table(results: dict) -> Table:
    """Per quantized site: what `auto` chooses from the untransformed tensor, and what each method that used it
    chose after its transforms (the first bit widths of its runs)."""
    runs = {f"{method} {bits.upper()} (after its transforms)": run["granularity_reasons"]
            for method, per_bits in results["sqnr"].items() for bits, run in list(per_bits.items())[:1]
            if "granularity_reasons" in run}
    header, rows = site_header(results), []
    for name, site in results["sites"].items():
        if "auto" in site:
            row = site_row(name, site)
            rows.append(row[:1] + row[-2:] + [site["auto"]["reason"]] + [r.get(name, "-") for r in runs.values()])
    return ("Token-wise outliers and the auto activation granularity at the quantized sites",
            header[:1] + header[-2:] + ["auto on the full-precision tensor, before any transform"] + list(runs), rows)


def described(results: dict, name: str, row: list[str]) -> list[str]:
    """A key site's row with its block's kind and what the site is."""
    return row[:1] + [block_kind(results, name), label(site_key(name))] + row[1:]


def transform_cell(stats: dict | None, chosen: bool) -> str:
    """A transform's numbers at a site; "-" where it has no measurement there (see the transforms definition)."""
    if stats is None:
        return "-"
    return (f"{number(stats['variance_max_min'])} / {stats['variance_cv']:.2f} / {stats['crest_factor']:.1f}"
            + (" *" if chosen else ""))


def tables(results: dict) -> list[Table]:
    sites = results["sites"]
    key = [described(results, name, site_row(name, sites[name])) for name in results["transforms"]]
    header = site_header(results)
    every = [site_row(name, site) for name, site in sites.items()]
    names = results["transform_names"]
    transform_rows = []
    for name, per_transform in results["transforms"].items():
        chosen = results["mambaquant_transform"][name.rsplit(".", 1)[1]]
        transform_rows.append(described(results, name, [name]) + [transform_cell(per_transform.get(t), t == chosen)
                                                                   for t in names])
    out = [("Key sites (the normed block input; Mamba: gate (Mamba-1), out_proj input, h, C; attention: v, o_proj "
            "input; MLPs and experts: down_proj input), every layer", header[:1] + ["block", "what"] + header[1:], key),
           auto_table(results),
           scan_table(results),
           (("After each transform: channel variance max / min, variance CV, crest factor (largest |x| of the kept "
            "rows / RMS); * what MambaQuant applies there; - not measured there"),
            ["site", "block", "what"] + list(names.values()), transform_rows)]
    if results["sqnr"]:
        runs = [(m, b, r) for m, per_bits in results["sqnr"].items() for b, r in per_bits.items()]
        kinds = list(runs[0][2]["kinds_db"])
        out.append(("SQNR (dB) per method: mean over the activation quantizers, the model output, mean per site kind",
                    ["method", "bits", "activations", "output"] + kinds,
                    [[m, b.upper(), number(r["activations_db"]), number(r["output_db"])]
                     + [number(r["kinds_db"].get(k, float("nan"))) for k in kinds] for m, b, r in runs]))
        layers = list(runs[0][2]["layers_db"])
        out.append(("Activation SQNR (dB) per layer", ["layer"] + [f"{m} {b.upper()}" for m, b, _ in runs],
                    [[layer] + [number(r["layers_db"][layer]) for _, _, r in runs] for layer in layers]))
    out.append(("Every site", header, every))
    return out


DEFINITION_LABELS = {"channel": "Channel", "kurtosis": "Kurtosis", "sqnr": "SQNR",
                     "channel_max_ratio": "Channel max / median", "variance_max_min": "Variance max / min",
                     "variance_cv": "Variance CV", "sampling": "Sampling", "token": "Token",
                     "token_outliers": "Token outliers", "auto": "Auto granularity", "transforms": "Transforms"}
SCAN_KINDS = ("conv", "dBu", "h", "hC", "y")  # the scan's input u, its discretised input, state, outputs


def scan_table(results: dict) -> Table:
    """Kurtosis along the scan of every layer and branch: what the recurrence does to the tails."""
    sites = results["sites"]
    rows = []
    for name, site in sites.items():
        if site["kind"] == "conv":
            prefix = name.rsplit(".", 1)[0]
            kurtosis = [sites[f"{prefix}.{kind}"]["kurtosis"] for kind in SCAN_KINDS]
            out_proj_in = sites[prefix.rsplit(".", 1)[0] + ".out_proj_in"]["kurtosis"]
            rows.append([prefix] + [number(k) for k in kurtosis + [out_proj_in]]
                        + [number(kurtosis[2] / kurtosis[0])])
        elif site["kind"] == "xBC":  # a Mamba-2 mixer: its scan input is x; dt*B*u and h*C have no site there
            prefix = name.rsplit(".", 1)[0]
            u, h, y, out_proj_in = (sites[f"{prefix}.{kind}"]["kurtosis"] for kind in ("x", "h", "y", "out_proj_in"))
            rows.append([prefix, number(u), "-", number(h), "-", number(y), number(out_proj_in), number(h / u)])
    header = ["branch", "u (scan input)", "dt*B*u", "h", "h*C", "y", "out_proj input", "h / u"]
    return "The scan's heavy tails: kurtosis from its input u to its outputs, per layer", header, rows


def preamble(results: dict) -> list[str]:
    c = results["calibration"]
    return [(f"Model: {results['model']} ({results['architecture']}). Calibration: {c['samples']} inputs of shape "
            f"{tuple(c['input_shape'])} from {c['set']} (training data), seed {c['seed']}; every number here comes "
            "from these inputs."),
            *(f"{DEFINITION_LABELS.get(name, name)}: {text}." for name, text in results["definitions"].items())]


def markdown(results: dict, figures: list[tuple[str, str]]) -> str:
    lines = [f"# Analysis of {results['model']}", "", *preamble(results), ""]
    for title, header, rows in tables(results):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines += ["## Plots", ""] + [f"- [{caption}]({path})" for path, caption in figures]
    return "\n".join(lines) + "\n"


def html(results: dict, figures: list[tuple[str, str]]) -> str:
    title = f"Analysis of {escape(results['model'])}"
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>",
             ("<style>body{font-family:sans-serif;margin:2em;max-width:1500px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "td:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}</style></head><body>"),
             f"<h1>{title}</h1>", *(f"<p>{escape(p)}</p>" for p in preamble(results)), "<h2>Plots</h2>"]
    for path, caption in figures:
        parts.append(f"<figure><img src='{escape(path)}' alt='{escape(caption)}'>"
                     f"<figcaption>{escape(caption)}</figcaption></figure>")
    for name, header, rows in tables(results):
        parts += [f"<h2>{escape(name)}</h2><table>",
                  "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
