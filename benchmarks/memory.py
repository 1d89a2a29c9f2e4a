"""Peak memory of quantization against model depth: `quantize` walks the model one block at a time, holding one
block's calibration activations, so the memory it needs beyond the model's own weights must not grow with the
number of layers.

For each depth, a fresh process builds a random-initialised model of the mamba-130m configuration (d_model 768),
or of mamba2-130m's with `--arch mamba2`, with that many layers, notes its resident memory, quantizes it
(calibration: random token ids; memory does not depend on their values) and reports its peak resident memory.
`quantize` returns a copy, so the peak holds the model twice (the copy's float weights are released block by block
as they become integer codes); the working
memory is what remains above the model and its copy:

    working = peak RSS - RSS after building the model - the model's weight bytes (the copy)

    python benchmarks/memory.py [--arch mamba1|mamba2] [--layers 24 48] [--methods rtn mambaquant] [--calib 8x256]
                                [--markdown FILE]
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

MIB = 2**20
# glibc raises its mmap threshold after large frees, after which freed tensors stay in the heap and the resident
# set stops following what is alive; a fixed threshold returns every large tensor to the system when it is freed
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**17)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(arch: str, layers: int, method: str, samples: int, length: int) -> dict:
    """Runs in the child process."""
    from mambaquant import quantize
    from mambaquant.runtime import LMConfig, Mamba2LMConfig, MambaLM, init_weights

    torch.set_num_threads(1)
    config = (LMConfig(d_model=768, n_layer=layers, vocab_size=50280) if arch == "mamba1" else
              Mamba2LMConfig(d_model=768, n_layer=layers, d_state=128, head_dim=64, vocab_size=50280))
    model = init_weights(MambaLM(config), seed=0).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    calib = torch.randint(0, 50280, (samples, length), generator=torch.Generator().manual_seed(0))
    built = rss_bytes()
    start = time.perf_counter()
    quantize(model, method=method, calib=calib, weight_rounding="rtn")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"layers": layers, "method": method, "weights": weights, "built": built, "peak": peak,
            "working": peak - built - weights, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["mamba1", "mamba2"], default="mamba1")
    parser.add_argument("--layers", type=int, nargs="+", default=[24, 48])
    parser.add_argument("--methods", nargs="+", default=["rtn", "mambaquant"])
    parser.add_argument("--calib", default="8x256", help="calibration samples x tokens")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arch, layers, method, samples, length = args.child
        print(json.dumps(measure(arch, int(layers), method, int(samples), int(length))))
        return
    samples, length = (int(v) for v in args.calib.split("x"))
    rows = []
    for method in args.methods:
        for layers in args.layers:
            child = subprocess.run([sys.executable, __file__, "--child", args.arch, str(layers), method, str(samples),
                                    str(length)], capture_output=True, text=True, check=True, env=CHILD_ENV)
            rows.append(json.loads(child.stdout))
    configuration = "mamba-130m" if args.arch == "mamba1" else "mamba2-130m"
    header = (f"Peak memory of `quantize` (weights rounded to nearest, W8A8) on random {configuration}-configuration "
              f"models, calibration {samples} x {length} tokens; {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, 1 thread.\n\n"
              "| method | layers | weights MiB | RSS built MiB | peak RSS MiB | working MiB | quantize s |\n"
              "|---|---:|---:|---:|---:|---:|---:|\n")
    table = header + "".join(
        f"| {r['method']} | {r['layers']} | {r['weights'] / MIB:.0f} | {r['built'] / MIB:.0f} | {r['peak'] / MIB:.0f} "
        f"| {r['working'] / MIB:.0f} | {r['seconds']:.1f} |\n" for r in rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(table)


if __name__ == "__main__":
    main()
