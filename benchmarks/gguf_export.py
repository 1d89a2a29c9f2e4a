"""Our GGUF exports in llama.cpp: quality against llama.cpp's own quantizer at the same GGUF types, and speed against
our runtime.

Quality (--quality): on the embedded models mamba-shakespeare and mamba2-shakespeare, bits per byte on the Tiny
Shakespeare validation split, measured in llama.cpp on each exported file, for our float export (F32), llama.cpp's
quantizer applied to it (Q8_0, Q4_0, Q4_K_M), and every method quantized with target="llama.cpp" at W8 (Q8_0) and
W4 (Q4_0), with per-channel weight scales and with groups of 32 (one float16 scale per Q8_0 / Q4_0 block either
way), calibrated on the training split; and, as llama.cpp's Q4_0 keeps the tied embedding and head at Q8_0, the
best 4-bit run with the head of the same method's 8-bit run. Windows as `mambaquant.evaluation.text.bits_per_byte`
cuts them (--window + 1 bytes overlapping by one, each byte after the first predicted once); each row also gives our
runtime's number on the same windows (for a target-llama.cpp model: the simulation of llama.cpp's arithmetic), and
the tables end with our best 4-bit export against llama.cpp's, at any size and in no more bytes.

Speed (--speed): random-initialised mamba-130m (and mamba2-130m) configurations; llama.cpp running our F32, Q8_0
and Q4_0 exports (RTN, target llama.cpp) against our runtime in FP32 and with the int8 backend (RTN W8A8, per-token
activation scales), all on --threads threads in this process, the variants alternating within each repeat. Prefill:
one pass over 512 tokens, logits of the last position only; decode: greedy, 64 new tokens after a 16-token prompt
(the prompt's pass included in the time).

    python benchmarks/llama_cpp.py [--quality] [--speed] [--window 1024] [--eval-bytes N] [--methods rtn ...]
                                   [--archs mamba1 mamba2] [--repeats 3] [--threads 2] [--markdown FILE]
"""

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import torch

import mambaquant
from mambaquant.data import tinyshakespeare_validation
from mambaquant.evaluation.text import bits_per_byte, logits_from
from mambaquant.exporters.gguf import export_gguf, require_gguf
from mambaquant.exporters.llama_run import LlamaCppModel, llama_quantize
from mambaquant.runtime import Mamba2LMConfig

QUALITY_MODELS = ("mamba-shakespeare", "mamba2-shakespeare")
METHODS = ("rtn", "gptq", "smoothquant", "quarot", "quamba", "quamba2", "mambaquant", "mambaquant+")
LLAMA_TYPES = {8: ("Q8_0",), 4: ("Q4_0", "Q4_K_M")}
GGUF_TYPE = {8: "Q8_0", 4: "Q4_0"}
MATRICES = ("ssm_in.weight", "ssm_x.weight", "ssm_dt.weight", "ssm_out.weight", "token_embd.weight", "output.weight")
SPEED_CONFIGS = {  # the 130m configurations of state-spaces/mamba-130m-hf and state-spaces/mamba2-130m
    "mamba1": ("mamba-130m", dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=16)),
    "mamba2": ("mamba2-130m", dict(hidden_size=768, num_hidden_layers=24, vocab_size=50288, state_size=128,
                                   head_dim=64, num_heads=24, n_groups=1, tie_word_embeddings=True)),
}
PROMPT_TOKENS, NEW_TOKENS, PREFILL_TOKENS = 16, 64, 512


class Row(NamedTuple):
    gguf_type: str
    weights: str  # "float", "llama.cpp" (its quantizer), "per channel" or "group 32"
    method: str
    size: int  # bytes of the .gguf
    types: str
    llama: float  # bits per byte in llama.cpp
    ours: float | None  # bits per byte in our runtime


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def matrix_types(path: Path) -> str:
    """How many of the file's weight matrices llama.cpp holds in each type, e.g. "Q4_0 13, F32 4"."""
    reader = require_gguf().GGUFReader(path)
    counts = Counter(t.tensor_type.name for t in reader.tensors if t.name.endswith(MATRICES))
    return ", ".join(f"{name} {count}" for name, count in counts.most_common())


def llama_bits_per_byte(path: Path, text: bytes, window: int, threads: int) -> float:
    """Bits per byte of a GGUF in llama.cpp, on bits_per_byte's windows (each window from a fresh state)."""
    with LlamaCppModel(path, threads=threads) as llm:
        def logits(batch: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.from_numpy(llm.logits(row.tolist())) for row in batch])

        return bits_per_byte(logits, text, window=window)[0]


def quality_table(name: str, args, text: bytes, folder: Path) -> list[str]:
    fp_model = mambaquant.load(name)
    mamba2 = isinstance(fp_model.config, Mamba2LMConfig)
    fp_path = export_gguf(fp_model, folder / f"{name}-f32.gguf")
    rows = []

    def add(gguf_type: str, weights: str, method: str, path: Path, ours: float | None) -> None:
        start = time.perf_counter()
        value = llama_bits_per_byte(path, text, args.window, args.threads)
        rows.append(Row(gguf_type, weights, method, path.stat().st_size, matrix_types(path), value, ours))
        log(f"{name} {gguf_type} {weights} {method}: {value:.4f} in llama.cpp, ours "
            f"{'-' if ours is None else f'{ours:.4f}'} ({time.perf_counter() - start:.0f} s to evaluate)")

    def add_ours(gguf_type: str, weights: str, method: str, model) -> None:
        path = export_gguf(model, folder / f"{name}-{method}.gguf")
        with torch.no_grad():
            ours = bits_per_byte(model, text, window=args.window)[0]
        add(gguf_type, weights, method, path, ours)
        path.unlink()

    with torch.no_grad():
        add("F32", "float", "fp (our export)", fp_path, bits_per_byte(fp_model, text, window=args.window)[0])
    models = {}  # (bits, group, method) -> the quantized model
    for bits in (8, 4):
        for file_type in LLAMA_TYPES[bits]:
            add(file_type, "llama.cpp", "llama.cpp's quantizer",
                llama_quantize(fp_path, folder / f"{name}-{file_type}.gguf", file_type, threads=args.threads), None)
        for group in (0, 32):
            for method in args.methods:
                if method == "quamba2" and not mamba2:
                    continue
                start = time.perf_counter()
                models[bits, group, method] = model = mambaquant.quantize(
                    fp_model, method=method, w_bits=bits, target="llama.cpp", weight_group_size=group,
                    calib="shakespeare-train", calib_samples=args.calib_samples, calib_len=args.calib_len)
                log(f"{name} {method} W{bits} group {group}: quantized in {time.perf_counter() - start:.0f} s")
                add_ours(GGUF_TYPE[bits], scales_name(group), method, model)
    # llama.cpp's quantizer keeps the (tied) head at Q8_0 in a Q4_0 file: the best 4-bit run with its own 8-bit head
    best = min((row for row in rows if row.gguf_type == "Q4_0" and row.ours is not None), key=lambda r: r.llama)
    group = next(g for g in (0, 32) if scales_name(g) == best.weights)
    mixed = copy.deepcopy(models[4, group, best.method])
    mixed.lm_head, mixed.embedding = models[8, group, best.method].lm_head, models[8, group, best.method].embedding
    add_ours("Q4_0, head Q8_0", best.weights, best.method, mixed)

    fp = rows[0].llama
    lines = ["| GGUF type | weight scales | method | file bytes | weight matrices | bits/byte in llama.cpp | "
             "our runtime | change | relative |", "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.gguf_type} | {row.weights} | {row.method} | {row.size:,} | {row.types} | "
                     f"{row.llama:.4f} | {'-' if row.ours is None else f'{row.ours:.4f}'} | {row.llama - fp:+.4f} | "
                     f"{(row.llama - fp) / fp * 100:+.2f} % |")
    return lines + [""] + verdict(rows)


def verdict(rows: list[Row]) -> list[str]:
    """Our best 4-bit export against each of llama.cpp's 4-bit files: at any size, and in no more bytes."""
    ours = [row for row in rows if row.gguf_type.startswith("Q4_0") and row.ours is not None]
    lines = []
    for theirs in (row for row in rows if row.gguf_type in LLAMA_TYPES[4] and row.ours is None):
        said = []
        for what, candidates in (("our best 4-bit export", ours),
                                 ("in no more bytes", [row for row in ours if row.size <= theirs.size])):
            if not candidates:
                said.append(f"{what}: none (our smallest is {min(row.size for row in ours):,} bytes)")
                continue
            best = min(candidates, key=lambda row: row.llama)
            said.append(f"{what}, {best.method} {best.gguf_type} {best.weights} ({best.llama:.4f} in {best.size:,} "
                        f"bytes), {'beats' if best.llama < theirs.llama else 'does not beat'} it")
        lines.append(f"- llama.cpp's {theirs.gguf_type}, {theirs.llama:.4f} bits/byte in {theirs.size:,} bytes: "
                     + "; ".join(said) + ".")
    return lines


def scales_name(group: int) -> str:
    return f"group {group}" if group else "per channel"


def quality(args) -> list[str]:
    text = tinyshakespeare_validation()[:args.eval_bytes]
    count = (len(text) - 1) // args.window
    lines = [f"Tiny Shakespeare validation split (the last 10 %), {count} windows of {args.window} + 1 bytes "
             f"overlapping by one: {count * args.window:,} predicted bytes, each window from a fresh state, the same "
             f"windows for every row and in both runtimes. Calibration: {args.calib_samples} x {args.calib_len} "
             f"bytes of the training split (shakespeare-train, seed 0). {args.threads} thread(s), llama.cpp's extra "
             "buffers (AMX repacking) off. Weight matrices: the GGUF types of in_proj, x_proj, dt_proj, out_proj, the "
             "embedding and the head (one tensor where they are tied).", ""]
    with tempfile.TemporaryDirectory(prefix="llama-cpp-bench-") as folder:
        for name in args.models:
            lines += [f"### {name}: bits per byte (lower is better)", ""]
            lines += quality_table(name, args, text, Path(folder)) + [""]
    return lines


def random_model(arch: str):
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    classes = {"mamba1": (MambaConfig, MambaForCausalLM), "mamba2": (Mamba2Config, Mamba2ForCausalLM)}
    config_class, model_class = classes[arch]
    torch.manual_seed(0)
    return mambaquant.load(model_class(config_class(initializer_range=0.02, **SPEED_CONFIGS[arch][1])).eval())


def median_speeds(runs: dict, tokens: int, repeats: int) -> dict:
    """Tokens per second of each run (median of `repeats`; the runs alternate within each repeat, after a
    warm-up)."""
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: tokens / statistics.median(values) for name, values in times.items()}


def speed_rows(arch: str, args, folder: Path) -> tuple[list[str], str]:
    model = random_model(arch)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    calib = torch.randint(0, vocab, (8, 128), generator=generator)
    int8 = mambaquant.quantize(model, method="rtn", w_bits=8, a_bits=8, act_granularity="token", backend="int8",
                               calib=calib, calib_samples=8)
    paths = {"llama.cpp F32": export_gguf(model, folder / f"{arch}-f32.gguf")}
    for bits in (8, 4):
        quantized = mambaquant.quantize(model, method="rtn", w_bits=bits, target="llama.cpp", calib=calib,
                                        calib_samples=8)
        paths[f"llama.cpp {GGUF_TYPE[bits]}"] = export_gguf(quantized, folder / f"{arch}-{GGUF_TYPE[bits]}.gguf")
        del quantized
    llamas = {name: LlamaCppModel(path, threads=args.threads) for name, path in paths.items()}
    ours = {"ours FP32": model, "ours int8 W8A8": int8}
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=generator)
    long_prompt = torch.randint(0, vocab, (1, PREFILL_TOKENS), generator=generator)

    def prefill(llm):
        return lambda: (llm.reset(), llm.decode(long_prompt[0].tolist(), 0, all_logits=False))

    prefills = {name: (lambda m=m: logits_from(m, long_prompt, PREFILL_TOKENS - 1)) for name, m in ours.items()}
    prefills.update({name: prefill(llm) for name, llm in llamas.items()})
    decodes = {name: (lambda m=m: m.generate(prompt, NEW_TOKENS, temperature=0)) for name, m in ours.items()}
    decodes.update({name: (lambda llm=llm: llm.greedy(prompt[0].tolist(), NEW_TOKENS)) for name, llm in llamas.items()})
    rows = []
    with torch.no_grad():
        for measurement, runs, tokens in ((f"prefill {PREFILL_TOKENS} tokens, tokens/s", prefills, PREFILL_TOKENS),
                                          (f"decode {NEW_TOKENS} tokens, tokens/s", decodes, NEW_TOKENS)):
            speeds = median_speeds(runs, tokens, args.repeats)
            base = speeds["ours FP32"]
            rows.append(f"| {SPEED_CONFIGS[arch][0]} | {measurement} | "
                        + " | ".join(f"{speed:.1f} ({speed / base:.2f}x)" for speed in speeds.values()) + " |")
            log(rows[-1])
    for llm in llamas.values():
        llm.close()
    sizes = ", ".join(f"{name.removeprefix('llama.cpp ')} {path.stat().st_size / 2**20:.0f} MiB"
                      for name, path in paths.items())
    return rows, f"{SPEED_CONFIGS[arch][0]} GGUF sizes: {sizes}"


def speed(args) -> list[str]:
    names = ("ours FP32", "ours int8 W8A8", "llama.cpp F32", "llama.cpp Q8_0", "llama.cpp Q4_0")
    lines = [f"Batch 1, {args.threads} threads everywhere, median of {args.repeats} (variants alternating), "
             "ratio to our FP32 runtime in brackets. Ours int8: RTN W8A8, per-token activation scales, "
             "`backend=\"int8\"`; llama.cpp Q8_0 / Q4_0: our RTN exports with target llama.cpp; calibration on 8 x "
             "128 random token ids.", "",
             "| configuration | measurement | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    notes = []
    with tempfile.TemporaryDirectory(prefix="llama-cpp-bench-") as folder:
        for arch in args.archs:
            rows, sizes = speed_rows(arch, args, Path(folder))
            lines += rows
            notes.append(sizes)
    return lines + [""] + [note + "." for note in notes]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", action="store_true", help="only the quality part (default: both)")
    parser.add_argument("--speed", action="store_true", help="only the speed part (default: both)")
    parser.add_argument("--models", nargs="+", default=list(QUALITY_MODELS), help="quality: embedded models")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--window", type=int, default=1024, help="quality: predicted bytes per window")
    parser.add_argument("--eval-bytes", type=int, help="quality: only the first N bytes of the split (a quick look)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--archs", nargs="+", choices=sorted(SPEED_CONFIGS), default=["mamba1"], help="speed")
    parser.add_argument("--repeats", type=int, default=3, help="speed")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's and torch's")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args()
    both = not (args.quality or args.speed)
    torch.set_num_threads(args.threads)
    lines = [f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"llama-cpp-python {version('llama_cpp_python')}.", ""]
    for part, wanted in ((quality, args.quality), (speed, args.speed)):
        if both or wanted:
            start = time.perf_counter()
            lines += part(args)
            lines += ["", f"({part.__name__} part: {time.perf_counter() - start:.0f} s)", ""]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
