"""Integer execution against full precision, in the same runtime: prefill latency, single-token decode throughput
and checkpoint size, W8A8 with int8 matrix products (`backend="int8"`) against the FP32 model.

Models: random-initialised models of the mamba-130m and mamba2-130m configurations (calibrated on random token ids:
speed and size do not depend on the weights' values) and the embedded models. Two W8A8 recipes: `rtn` (plain integer
linears) and `mambaquant` (`auto` granularity, with its online Hadamards and state rotation); weights rounded to
nearest in both (GPTQ would give the same speed and size, and takes minutes on the 130m model). FP32 and int8
timings alternate within one run, so their ratio is measured under the same conditions.

    python benchmarks/int8.py [--models mamba-130m mamba2-130m mamba-shakespeare typeseg vim-cifar10] [--repeats 5]
                              [--markdown FILE]
"""

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mambaquant
from mambaquant.methods import set_backend
from mambaquant.runtime import LMConfig, Mamba2LMConfig, MambaLM, VisionMamba, init_weights
from mambaquant.zoo import ZOO

RECIPES = ("rtn", "mambaquant")
RANDOM_MODELS = {"mamba-130m": LMConfig(d_model=768, n_layer=24, vocab_size=50280),
                 "mamba2-130m": Mamba2LMConfig(d_model=768, n_layer=24, d_state=128, head_dim=64, vocab_size=50280)}


def load_model(name: str):
    if name in RANDOM_MODELS:
        return init_weights(MambaLM(RANDOM_MODELS[name]), seed=0).eval()
    return mambaquant.load(name)


def example_input(model, tokens: int, generator: torch.Generator) -> torch.Tensor:
    if isinstance(model, VisionMamba):
        return torch.randn(tokens, 3, model.config.img_size, model.config.img_size, generator=generator)
    return torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)


def calibration(model, name: str) -> torch.Tensor | None:
    """The model's own calibration set; random token ids for the random-initialised 130m models."""
    if name in RANDOM_MODELS:
        return torch.randint(0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    return None


@torch.no_grad()
def timed(run, repeats: int) -> list[float]:
    run()  # warm-up (builds the int8 layouts)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def decode_tokens_per_second(model, steps: int = 32) -> float:
    cache = model.new_cache(1)
    token = torch.zeros(1, 1, dtype=torch.long)
    model(token, cache)
    start = time.perf_counter()
    for _ in range(steps):
        model(token, cache)
    return steps / (time.perf_counter() - start)


def directory_mib(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".safetensors") / 2**20


def benchmark(name: str, repeats: int) -> list[dict]:
    model = load_model(name)
    is_vision = isinstance(model, VisionMamba)
    shapes = (32, 128) if is_vision else (128, 1024)  # images per batch, or tokens
    variants = {"fp32": model}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        sizes["fp32"] = directory_mib(mambaquant.save(model, Path(tmp) / "fp32"))
        for method in RECIPES:
            quantized = mambaquant.quantize(model, method=method, calib=calibration(model, name), calib_samples=8,
                                            weight_rounding="rtn")
            variants[method] = set_backend(quantized, "int8")
            sizes[method] = directory_mib(mambaquant.save(quantized, Path(tmp) / method))
        w4 = mambaquant.quantize(model, method="mambaquant", w_bits=4, calib=calibration(model, name), calib_samples=8,
                                 weight_rounding="rtn")
        sizes["mambaquant-w4a8"] = directory_mib(mambaquant.save(w4, Path(tmp) / "w4"))
    rows = []
    generator = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = example_input(model, shape, generator)
        samples = {label: [] for label in variants}
        for _ in range(repeats):  # alternate, so that every variant sees the same machine conditions
            for label, variant in variants.items():
                samples[label] += timed(lambda v=variant, x=x: v(x), 1)
        fp = statistics.median(samples["fp32"])
        for label in RECIPES:
            seconds = statistics.median(samples[label])
            what = f"batch of {shape} images" if is_vision else f"prefill {shape} tokens"
            rows.append({"model": name, "what": what, "recipe": label, "fp32": fp, "int8": seconds, "speedup": fp / seconds})
    if not is_vision and hasattr(model, "new_cache"):
        fp = statistics.median(decode_tokens_per_second(model) for _ in range(3))
        for label in RECIPES:
            rate = statistics.median(decode_tokens_per_second(variants[label]) for _ in range(3))
            rows.append({"model": name, "what": "decode, tokens/s", "recipe": label, "fp32": fp, "int8": rate,
                         "speedup": rate / fp})
    for label in ("rtn", "mambaquant", "mambaquant-w4a8"):
        rows.append({"model": name, "what": "checkpoint MiB", "recipe": label, "fp32": sizes["fp32"],
                     "int8": sizes[label], "speedup": sizes[label] / sizes["fp32"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | measurement | W8A8 recipe | FP32 | int8 | ratio |", "|---|---|---|---:|---:|---:|"]
    for row in rows:
        is_size, is_rate = row["what"] == "checkpoint MiB", row["what"].startswith("decode")
        ratio = (f"{row['speedup']:.3f}x FP32 size" if is_size else f"{row['speedup']:.2f}x faster")
        fmt = "{:.1f}" if (is_size or is_rate) else "{:.3f} s"
        recipe = row["recipe"] if row["recipe"] != "mambaquant-w4a8" else "mambaquant W4A8"
        lines.append(f"| {row['model']} | {row['what']} | {recipe} | {fmt.format(row['fp32'])} | "
                     f"{fmt.format(row['int8'])} | {ratio} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[*RANDOM_MODELS, *ZOO])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows += benchmark(name, args.repeats)
        print(f"{name} done", flush=True)
    text = table(rows)
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
              f"median of {args.repeats}")
    print(header)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
