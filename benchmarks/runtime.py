"""Prefill latency and peak memory: our runtime against transformers' MambaForCausalLM (CPU path), both fp32,
batch 1, all logits returned, on a random-initialised model of the mamba-130m configuration.

Every measurement runs in a fresh worker process, so peak memory (RSS above the loaded model) is its own;
the ours/transformers pairs alternate within one run, so their ratio is measured under the same conditions.

    python benchmarks/runtime.py [--lengths 128 512 1024] [--repeats 3] [--markdown FILE]
"""

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

IMPLEMENTATIONS = ("mambaquant", "transformers")


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) from /proc/self/status."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak_memory() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def worker(implementation: str, length: int, repeats: int) -> dict:
    from transformers import MambaConfig, MambaForCausalLM

    import mambaquant

    torch.manual_seed(0)
    config = MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280, initializer_range=0.02)
    hf_model = MambaForCausalLM(config).eval()
    model = mambaquant.load(hf_model) if implementation == "mambaquant" else hf_model
    if implementation == "mambaquant":
        del hf_model
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        run = (lambda: model(ids)) if implementation == "mambaquant" else (lambda: model(ids, use_cache=False).logits)
        run()  # warm-up
        reset_peak_memory()
        baseline = memory_mib("VmRSS")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return {"implementation": implementation, "length": length, "seconds": statistics.median(times),
            "peak_mib_over_model": memory_mib("VmHWM") - baseline}


def measure(implementation: str, length: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", implementation, str(length), str(repeats)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        implementation, length, repeats = args.worker
        print(json.dumps(worker(implementation, int(length), int(repeats))))
        return

    rows = []
    for length in args.lengths:
        result = {impl: measure(impl, length, args.repeats) for impl in IMPLEMENTATIONS}
        ours, theirs = result["mambaquant"], result["transformers"]
        rows.append((length, ours, theirs))
        print(f"measured {length} tokens", file=sys.stderr)

    lines = [
        f"mamba-130m configuration, fp32, batch 1, CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}, median of {args.repeats}",
        "",
        "| tokens | mambaquant (s) | transformers (s) | speed-up | peak MiB over model, ours | transformers |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for length, ours, theirs in rows:
        lines.append(
            f"| {length} | {ours['seconds']:.3f} | {theirs['seconds']:.3f} | {theirs['seconds'] / ours['seconds']:.2f}x "
            f"| {ours['peak_mib_over_model']:.0f} | {theirs['peak_mib_over_model']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
