"""Issue 34's generality suite: every method at W8A8, W4A8, W4A16 and W4A4 with every activation granularity on
each trained fixture of tests/data/generality (benchmarks/train_generality.py: models of shapes the embedded models
do not have), calibrated on its training data and evaluated on its held-out split, through the public API
(`mambaquant.compare.compare` with `calib=` and `eval_data=`).

For each recommended recipe (MambaQuant with its default granularity `auto`, and mambaquant+) the table gives its
distance to the best baseline (RTN, SmoothQuant, QuaRot, GPTQ, Quamba) at equal granularity: at `tensor` the best
static baseline, at `token` the best dynamic one, at `auto` (a per-site choice between them) the best of both, at
W4A16 (no activation quantization) the best weight-only baseline. Goal: never more than 0.5 points, or 0.5 %
relative, below it. Where a recipe misses, the column "where the points go" says what recovers them: the one
activation quantizer whose tensor, alone in float (everything else as quantized), gives the highest top-1; the recipe
rerun with its linear layers' inputs alone quantized (scope "linear": the conv, the scan and its state in float); and
the recipe with its activations in float (weights only). Neither single site nor scope recovering, with weights only
recovering, means the error is spread over many sites; weights only not recovering means the weights lose it.

    python benchmarks/generality.py [--models timeseries,vision] [--bits w8a8,w4a4] [--json FILE] [--markdown FILE]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_generality import NAMES, load_fixture  # noqa: E402

BITS = ("w8a8", "w4a8", "w4a16", "w4a4")
BASELINES = ("rtn", "smoothquant", "quarot", "gptq", "quamba")
RECOMMENDED = ("mambaquant", "mambaquant+")
METHODS = BASELINES + RECOMMENDED
# the recommended recipes with `decide` (their optional parts kept only where they help on held-back calibration
# data), at their own granularity (auto; none at W4A16)
DECIDED = tuple(f"{method} decided" for method in RECOMMENDED)
COLUMNS = METHODS + DECIDED
GOAL_POINTS, GOAL_RELATIVE = 0.5, 0.5  # never more than 0.5 points or 0.5 % relative below the best baseline


def goal_met(value: float, best: float) -> bool:
    return value >= best - max(GOAL_POINTS, GOAL_RELATIVE / 100 * abs(best)) - 1e-9


def measure(name: str, bits, log) -> dict:
    from mambaquant.compare import USER_TASK, compare

    model, calib, (inputs, labels), record = load_fixture(name)
    rows = compare(model, methods=("fp",) + METHODS, bits=bits, granularities=("tensor", "token", "auto"),
                   calib=calib, calib_samples=len(calib), eval_data=(inputs, labels), seed=0,
                   on_row=lambda row: log(f"{name} {row.method} {row.bits} {row.granularity}: {row.value:.2f} % "
                                          f"({row.quantize_seconds:.1f} s)"))
    rows = [row for row in rows if row.task == USER_TASK]
    results = {(row.method, row.bits, row.granularity): row.value for row in rows if row.method != "fp"}
    results |= decided_results(model, calib, (inputs, labels), bits, name, log)
    fp = next(row.value for row in rows if row.method == "fp")
    return {"fp": fp, "results": results, "record": record, "model": model, "calib": calib,
            "eval": (inputs, labels)}


def decided_results(model, calib, eval_data, bits, name: str, log) -> dict:
    """(method + " decided", bits, granularity) -> top-1 of the recommended recipes quantized with `decide`."""
    import mambaquant
    from mambaquant.evaluation import evaluate
    from mambaquant.methods import PRESETS

    results = {}
    for preset in bits:
        w_bits, a_bits = PRESETS[preset]
        granularity = "none" if a_bits == 16 else "auto"
        for method, column in zip(RECOMMENDED, DECIDED):
            started = time.time()
            quantized = mambaquant.quantize(model, method=method, w_bits=w_bits, a_bits=a_bits, calib=calib,
                                            calib_samples=len(calib), decide=True)
            value = evaluate(quantized, "fixture", eval_data=eval_data).value
            results[(column, preset, granularity)] = value
            log(f"{name} {column} {preset} {granularity}: {value:.2f} % ({time.time() - started:.1f} s; "
                + "; ".join(quantized.quantization_report.decisions[1:]) + ")")
    return results


def table_rows(measured: dict, bits) -> list[dict]:
    """One row per (bits, granularity): every method's top-1, the best baseline, each recommended recipe's
    distance to it."""
    results = measured["results"]
    out = []
    for preset in bits:
        for granularity in (("none",) if preset == "w4a16" else ("tensor", "token", "auto")):
            compared = ("tensor", "token") if granularity == "auto" else (granularity,)
            baseline = {(method, g): results[(method, preset, g)] for method in BASELINES for g in compared
                        if (method, preset, g) in results}
            (best_method, best_granularity), best = max(baseline.items(), key=lambda item: item[1])
            row = {"bits": preset, "granularity": granularity, "best": best,
                   "best_by": best_method + (f" ({best_granularity})" if granularity == "auto" else ""),
                   "values": {m: results.get((m, preset, granularity)) for m in COLUMNS}, "distance": {},
                   "met": {}}
            for method in RECOMMENDED + DECIDED:
                value = results.get((method, preset, granularity))
                if value is not None:
                    row["distance"][method] = value - best
                    row["met"][method] = goal_met(value, best)
            out.append(row)
    return out


def attribute(measured: dict, preset: str, granularity: str, method: str) -> str:
    """Where a missed recipe loses its points: with activations, the one activation quantizer whose removal (that
    tensor in float, everything else as quantized) recovers the most, and the recipe rerun with its linear layers'
    inputs alone quantized (scope "linear"); always, the recipe with its activations in float (weights only)."""
    import mambaquant
    from mambaquant.evaluation import evaluate
    from mambaquant.methods import PRESETS
    from mambaquant.quant.quantizer import ActivationQuantizer

    w_bits, a_bits = PRESETS[preset]
    model, calib, eval_data = measured["model"], measured["calib"], measured["eval"]

    def top1(quantized) -> float:
        return evaluate(quantized, "fixture", eval_data=eval_data).value

    def run(**options):
        return mambaquant.quantize(model, method=method, w_bits=w_bits, calib=calib, calib_samples=len(calib),
                                   **options)

    parts = []
    if a_bits != 16:
        options = dict(a_bits=a_bits, act_granularity=granularity)
        quantized = run(**options)
        recovered = {}
        for name, quantizer in quantized.named_modules():
            if isinstance(quantizer, ActivationQuantizer):
                quantizer.forward = lambda x, *args, **kwargs: x  # this tensor alone in float
                recovered[name] = top1(quantized)
                del quantizer.forward
        name, value = max(recovered.items(), key=lambda item: item[1])
        where = name.replace(".input_quantizer", " input").replace(".sites.", ".").removesuffix(".op")
        parts.append(f"{where.split('.op.')[0]} in float: {value:.1f}")
        parts.append(f"linear inputs only: {top1(run(**options, scope='linear')):.1f}")
    parts.append(f"weights only: {top1(run(a_bits=16)):.1f}")
    return ", ".join(parts)


def markdown(name: str, measured: dict, rows: list[dict]) -> str:
    record = measured["record"]
    lines = [f"#### {name}: {record['task']}", "",
             f"FP top-1 {measured['fp']:.2f} % on {record['eval_samples']} held-out samples (chance "
             f"{record['chance_top1']:.1f} %); calibration: {record['calib_samples']} training samples. Top-1 % per "
             "method; Δ: the recommended recipe minus the best baseline at equal granularity (points); goal: Δ ≥ "
             "-0.5.", "",
             "| bits | granularity | " + " | ".join(COLUMNS) + " | best baseline | "
             + " | ".join(f"Δ {m}" for m in RECOMMENDED + DECIDED) + " | goal met | where the points go (missed) |",
             "|---|---|" + "---:|" * len(COLUMNS) + "---|" + "---:|" * len(RECOMMENDED + DECIDED) + "---|---|"]
    for row in rows:
        values = " | ".join("-" if row["values"][m] is None else f"{row['values'][m]:.2f}" for m in COLUMNS)
        distances = " | ".join(f"{row['distance'][m]:+.2f}" if m in row["distance"] else "-"
                               for m in RECOMMENDED + DECIDED)
        met = ", ".join(f"{m} {'yes' if ok else 'NO'}" for m, ok in row["met"].items())
        lines.append(f"| {row['bits'].upper()} | {row['granularity']} | {values} | {row['best']:.2f} "
                     f"({row['best_by']}) | {distances} | {met} | {row.get('why', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(NAMES))
    parser.add_argument("--bits", default=",".join(BITS))
    parser.add_argument("--no-attribution", action="store_true", help="skip the reruns of missed recipes")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    bits = [b.strip().lower() for b in args.bits.split(",") if b.strip()]
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    sections, dump = [], {}
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        measured = measure(name, bits, log)
        rows = table_rows(measured, bits)
        for row in rows:
            missed = [m for m, ok in row["met"].items() if not ok and m in RECOMMENDED]
            if missed and not args.no_attribution:
                row["why"] = "; ".join(f"{m}: {attribute(measured, row['bits'], row['granularity'], m)}"
                                       for m in missed)
                log(f"{name} {row['bits']} {row['granularity']} missed: {row['why']}")
        sections.append(markdown(name, measured, rows))
        print("\n" + sections[-1], flush=True)
        dump[name] = {"fp": measured["fp"], "rows": rows,
                      "results": {" ".join(key): value for key, value in measured["results"].items()}}
    command = "python benchmarks/generality.py" + (f" {' '.join(argv)}" if argv else " " + " ".join(sys.argv[1:]))
    text = "\n".join(sections) + f"\nCommand: `{command.strip()}` ({time.time() - started:.0f} s)\n"
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(dump, indent=1) + "\n")


if __name__ == "__main__":
    main()
