"""Integer execution against full precision, in the same runtime and process: prefill latency (batch 1 and 8),
decode throughput (batch 1 and 8), resident memory of the loaded model and checkpoint size, for the rtn and
mambaquant recipes at W8A8, W4A8, W8A16 and W4A16 with `backend="int8"`.

Models: random-initialised models of the mamba-130m and mamba2-130m configurations, calibrated on random token ids
(speed and size do not depend on the weights' values), or embedded models by name. Weights are rounded to nearest
(GPTQ gives the same speed and size and takes minutes on a 130m model). Every variant is saved, then loaded back with
`mambaquant.load` as a user runs it; the timed models are those reloaded ones. The variants' timings alternate
within each repeat, so their ratios are measured under the same machine conditions. Time is wall time, with the
process's system (kernel) time of the same calls beside it. Resident memory: RSS after `mambaquant.load(DIR)` and
`set_backend(model, "int8")` in a fresh process, minus the RSS of that process after its imports, once glibc has
returned the loader's freed temporaries (`malloc_trim`; mambaquant's allocator settings keep freed memory for reuse,
so the RSS right after loading also counts the largest temporaries of the load; the table gives both).

    python benchmarks/int8.py [--models mamba-130m mamba2-130m] [--recipes rtn mambaquant]
                              [--precisions W8A8 W4A8 W8A16 W4A16] [--repeats 3] [--markdown FILE]
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mambaquant
from mambaquant.methods import set_backend
from mambaquant.runtime import LMConfig, Mamba2LMConfig, MambaLM, VisionMamba, init_weights

PRECISIONS = {"W8A8": (8, 8), "W4A8": (4, 8), "W8A16": (8, 16), "W4A16": (4, 16)}
RANDOM_MODELS = {"mamba-130m": LMConfig(d_model=768, n_layer=24, vocab_size=50280),
                 "mamba2-130m": Mamba2LMConfig(d_model=768, n_layer=24, d_state=128, head_dim=64, vocab_size=50280)}
PREFILL_SHAPES = ((1, 128), (1, 1024), (8, 128))  # (batch, tokens)
DECODE_BATCHES = (1, 8)
RESIDENT_PROBE = """
import ctypes, json, sys
import mambaquant
from mambaquant.methods import set_backend
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
trim = ctypes.CDLL(None).malloc_trim
baseline = rss()
model = mambaquant.load(sys.argv[1])
if sys.argv[2] == "int8":
    set_backend(model, "int8")
loaded = rss()
trim(0)
print(json.dumps({"resident": rss() - baseline, "before_trim": loaded - baseline}))
"""


def load_model(name: str):
    if name in RANDOM_MODELS:
        return init_weights(MambaLM(RANDOM_MODELS[name]), seed=0).eval()
    return mambaquant.load(name)


def calibration(model, name: str) -> torch.Tensor | None:
    """The model's own calibration set; random token ids for the random-initialised 130m models."""
    if name in RANDOM_MODELS:
        return torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    return None


def resident_mib(directory: Path, backend: str) -> float:
    result = subprocess.run([sys.executable, "-c", RESIDENT_PROBE, str(directory), backend], capture_output=True,
                            text=True, check=True)
    measured = json.loads(result.stdout.splitlines()[-1])
    return measured["resident"], measured["before_trim"]


def checkpoint_mib(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".safetensors") / 2**20


def clock() -> tuple[float, float]:
    """(wall seconds, this process's system seconds) now."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_stime


@torch.no_grad()
def timed(run) -> tuple[float, float]:
    """(wall seconds, system seconds) of one call."""
    wall, system = clock()
    run()
    wall_end, system_end = clock()
    return wall_end - wall, system_end - system


@torch.no_grad()
def decode(model, batch: int, steps: int = 16) -> None:
    cache = model.new_cache(batch)
    token = torch.zeros(batch, 1, dtype=torch.long)
    model(token, cache)
    for _ in range(steps):
        model(token, cache)


def build_variants(model, name: str, recipes, precisions, directory: Path) -> tuple[dict, dict, dict]:
    """Save the FP32 model and every quantized variant, reload each, and measure its size on disk and in memory."""
    sizes, resident, variants = {}, {}, {}
    fp32_dir = mambaquant.save(model, directory / "fp32")
    sizes["fp32"], resident["fp32"] = checkpoint_mib(fp32_dir), resident_mib(fp32_dir, "fake")
    variants["fp32"] = mambaquant.load(fp32_dir)
    for recipe in recipes:
        for precision in precisions:
            w_bits, a_bits = PRECISIONS[precision]
            label = f"{recipe} {precision}"
            quantized = mambaquant.quantize(model, method=recipe, w_bits=w_bits, a_bits=a_bits,
                                            calib=calibration(model, name), calib_samples=4, weight_rounding="rtn")
            saved = mambaquant.save(quantized, directory / label.replace(" ", "-"))
            del quantized
            sizes[label], resident[label] = checkpoint_mib(saved), resident_mib(saved, "int8")
            variants[label] = set_backend(mambaquant.load(saved), "int8")
            print(f"  {label}: saved and reloaded", flush=True)
    return variants, sizes, resident


def benchmark(name: str, recipes, precisions, repeats: int) -> list[dict]:
    model = load_model(name)
    if isinstance(model, VisionMamba):
        raise SystemExit(f"{name} is a vision model; this benchmark measures language models (prefill, decode)")
    with tempfile.TemporaryDirectory() as tmp:
        variants, sizes, resident = build_variants(model, name, recipes, precisions, Path(tmp))
    del model
    generator = torch.Generator().manual_seed(1)
    rows = []
    for batch, tokens in PREFILL_SHAPES:
        ids = torch.randint(0, variants["fp32"].config.vocab_size, (batch, tokens), generator=generator)
        samples = {label: [] for label in variants}
        for variant in variants.values():
            variant(ids)  # warm-up
        for _ in range(repeats):
            for label, variant in variants.items():
                samples[label].append(timed(lambda v=variant: v(ids)))
        rows += result_rows(name, f"prefill {batch}x{tokens}", samples, lower_is_better=True)
    for batch in DECODE_BATCHES:
        steps = 16
        samples = {label: [] for label in variants}
        for variant in variants.values():
            decode(variant, batch, 2)
        for _ in range(repeats):
            for label, variant in variants.items():
                wall, system = timed(lambda v=variant: decode(v, batch, steps))
                samples[label].append((batch * (steps + 1) / wall, system))
        rows += result_rows(name, f"decode batch {batch}, tokens/s", samples, lower_is_better=False)
    for label in sizes:
        rows.append({"model": name, "what": "checkpoint MiB", "variant": label, "value": sizes[label],
                     "system": None, "ratio": sizes[label] / sizes["fp32"]})
    for label, (held, before_trim) in resident.items():
        rows.append({"model": name, "what": "resident MiB after load", "variant": label, "value": held,
                     "system": None, "ratio": held / resident["fp32"][0]})
        rows.append({"model": name, "what": "resident MiB before trim", "variant": label, "value": before_trim,
                     "system": None, "ratio": before_trim / resident["fp32"][1]})
    return rows


def result_rows(name: str, what: str, samples: dict, lower_is_better: bool) -> list[dict]:
    medians = {label: (statistics.median(v for v, _ in runs), statistics.median(s for _, s in runs))
               for label, runs in samples.items()}
    fp32 = medians["fp32"][0]
    return [{"model": name, "what": what, "variant": label, "value": value, "system": system,
             "ratio": fp32 / value if lower_is_better else value / fp32} for label, (value, system) in medians.items()]


def table(rows: list[dict]) -> str:
    lines = ["| model | measurement | variant | value | system s | ratio to FP32 |", "|---|---|---|---:|---:|---:|"]
    for row in rows:
        if row["what"].startswith("prefill"):
            value, ratio = f"{row['value']:.3f} s", f"{row['ratio']:.2f}x faster"
        elif row["what"].startswith("decode"):
            value, ratio = f"{row['value']:.1f}", f"{row['ratio']:.2f}x faster"
        else:
            value, ratio = f"{row['value']:.1f}", f"{row['ratio']:.3f}x"
        system = "" if row["system"] is None else f"{row['system']:.3f}"
        lines.append(f"| {row['model']} | {row['what']} | {row['variant']} | {value} | {system} | {ratio} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(RANDOM_MODELS))
    parser.add_argument("--recipes", nargs="+", default=["rtn", "mambaquant"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{platform.processor() or platform.machine()}, median of {args.repeats}")
    rows = []
    for name in args.models:
        rows += benchmark(name, args.recipes, args.precisions, args.repeats)
        print(f"{name} done", flush=True)
        if args.markdown:  # a partial table survives a run cut short
            Path(args.markdown).write_text(header + "\n\n" + table(rows) + "\n")
    print(header)
    print(table(rows))


if __name__ == "__main__":
    main()
