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

Streamed quantization of models larger than memory (`--streamed`): for each configuration a random-initialised
checkpoint is written to disk in bfloat16, block by block (never whole in memory), in Hugging Face shards; then for
each method and bit width a fresh process runs `mambaquant.quantize(DIR, out=OUT, stream=True)` with mambaquant's
own allocator settings (what a user gets) and reports its peak RSS (ru_maxrss), wall time and the output's size.

    python benchmarks/memory.py --streamed mamba-1.4b mamba-2.8b falcon-mamba-7b [--methods rtn gptq mambaquant]
                                [--bits w8a8 w4a16] [--calib 8x256] [--work DIR] [--markdown FILE]
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


# Hugging Face configurations (state-spaces/mamba-1.4b-hf, mamba-2.8b-hf, tiiuae/falcon-mamba-7b)
STREAMED_CONFIGS = {
    "mamba-1.4b": {"model_type": "mamba", "hidden_size": 2048, "num_hidden_layers": 48, "vocab_size": 50280,
                   "tie_word_embeddings": True},
    "mamba-2.8b": {"model_type": "mamba", "hidden_size": 2560, "num_hidden_layers": 64, "vocab_size": 50280,
                   "tie_word_embeddings": True},
    "falcon-mamba-7b": {"model_type": "falcon_mamba", "architectures": ["FalconMambaForCausalLM"],
                        "hidden_size": 4096, "num_hidden_layers": 64, "vocab_size": 65024, "mixer_rms_eps": 1e-6,
                        "tie_word_embeddings": False},
}
SHARD_BYTES = 2 * 2**30


def write_random_checkpoint(name: str, directory) -> int:
    """A random-initialised bf16 checkpoint of configuration `name` in `directory`, written block by block; returns
    the parameter count. An existing complete one is kept."""
    from pathlib import Path

    from safetensors.torch import save_file

    from mambaquant.loaders import hf
    from mambaquant.loaders.weights import rename
    from mambaquant.runtime import MambaBlock, init_weights

    directory = Path(directory)
    config_dict = {**STREAMED_CONFIGS[name], "state_size": 16, "expand": 2, "conv_kernel": 4}
    config = hf.lm_config_from_hf(config_dict, name)
    done = directory / "complete.json"
    if done.exists():
        return json.loads(done.read_text())["parameters"]
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, shard, shard_bytes, shards, parameters = {}, {}, 0, [], 0

    def add(tensors: dict) -> None:
        nonlocal shard, shard_bytes
        for runtime_name, tensor in tensors.items():
            hf_name = next(iter(rename({runtime_name: None}, hf.TO_HF)))
            shard[hf_name] = tensor.to(torch.bfloat16).contiguous()
            shard_bytes += shard[hf_name].numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            file = f"shard-{len(shards) + 1}.safetensors"
            save_file(shard, directory / file)
            shards.append(file)
            weight_map.update(dict.fromkeys(shard, file))
            shard, shard_bytes = {}, 0

    torch.manual_seed(0)
    ends = {"embedding.weight": torch.randn(config.vocab_size, config.d_model) * 0.02,
            "norm_f.weight": torch.ones(config.d_model)}
    if not config.tie_embeddings:
        ends["lm_head.weight"] = torch.randn(config.vocab_size, config.d_model) * 0.02
    parameters += sum(t.numel() for t in ends.values())
    add(ends)
    del ends
    for index in range(config.n_layer):
        block = init_weights(MambaBlock(config), seed=index)
        tensors = {f"layers.{index}.{k}": v for k, v in block.state_dict().items()}
        parameters += sum(t.numel() for t in tensors.values())
        add(tensors)
        del block, tensors
    flush()
    index = {"metadata": {"total_size": sum((directory / f).stat().st_size for f in shards)},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config_dict, indent=1))
    done.write_text(json.dumps({"parameters": parameters}))
    return parameters


def measure_streamed(directory: str, out: str, method: str, bits: str, samples: int, length: int) -> dict:
    """Runs in the child process."""
    import mambaquant

    w_bits, a_bits = (int(v) for v in bits[1:].split("a"))
    with open(f"{directory}/config.json") as f:
        vocab = json.load(f)["vocab_size"]
    calib = torch.randint(0, vocab, (samples, length), generator=torch.Generator().manual_seed(0))
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    mambaquant.quantize(directory, method=method, w_bits=w_bits, a_bits=a_bits, calib=calib, out=out,
                        stream=True, overwrite=True, progress=True)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak": usage.ru_maxrss * 1024, "seconds": seconds, "system": usage.ru_stime - cpu.ru_stime}


def print_table(table: str, markdown: str | None) -> None:
    print(table)
    if markdown:
        with open(markdown, "w") as out:
            out.write(table)


def streamed_main(args) -> None:
    import shutil
    from pathlib import Path

    samples, length = (int(v) for v in args.calib.split("x"))
    work = Path(args.work)
    rows = []
    for name in args.streamed:
        source = work / name
        started = time.perf_counter()
        parameters = write_random_checkpoint(name, source)
        print(f"{name}: {parameters / 1e9:.2f} B parameters, bf16 checkpoint in {source} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        on_disk = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        for method in args.methods:
            for bits in args.bits:
                out = work / f"{name}-{method}-{bits}"
                child = subprocess.run([sys.executable, __file__, "--streamed-child", str(source), str(out), method,
                                        bits, str(samples), str(length)], stdout=subprocess.PIPE, text=True)
                if child.returncode:
                    print(f"{name} {method} {bits}: failed (exit {child.returncode})", file=sys.stderr, flush=True)
                    continue
                result = json.loads(child.stdout.strip().splitlines()[-1])
                output = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                rows.append({"config": name, "parameters": parameters, "fp32": parameters * 4, "bf16": on_disk,
                             "method": method, "bits": bits, "output": output, **result})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                shutil.rmtree(out)
    header = (f"Streamed quantization (`mambaquant.quantize(DIR, out=OUT, stream=True)`) of random-initialised bf16 "
              f"checkpoints; calibration {samples} x {length} tokens; {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads.\n\n"
              "| configuration | parameters | FP32 GiB | bf16 on disk GiB | method | bits | peak RSS GiB | "
              "peak / FP32 | wall s | system s | output GiB |\n|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|\n")
    gib = 2**30
    table = header + "".join(
        f"| {r['config']} | {r['parameters'] / 1e9:.2f} B | {r['fp32'] / gib:.1f} | {r['bf16'] / gib:.1f} | "
        f"{r['method']} | {r['bits'].upper()} | {r['peak'] / gib:.2f} | {r['peak'] / r['fp32']:.3f}x | "
        f"{r['seconds']:.0f} | {r['system']:.0f} | {r['output'] / gib:.2f} |\n" for r in rows)
    print_table(table, args.markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["mamba1", "mamba2"], default="mamba1")
    parser.add_argument("--layers", type=int, nargs="+", default=[24, 48])
    parser.add_argument("--methods", nargs="+", default=["rtn", "mambaquant"])
    parser.add_argument("--calib", default="8x256", help="calibration samples x tokens")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--streamed", nargs="+", choices=list(STREAMED_CONFIGS), help="streamed quantization of "
                        "these configurations instead (checkpoints written to --work)")
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w4a16"], help="--streamed: bit widths")
    parser.add_argument("--work", default="/tmp/mambaquant-memory", help="--streamed: where the checkpoints go")
    parser.add_argument("--streamed-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.streamed_child:
        directory, out, method, bits, samples, length = args.streamed_child
        print(json.dumps(measure_streamed(directory, out, method, bits, int(samples), int(length))))
        return
    if args.streamed:
        streamed_main(args)
        return
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
    print_table(table, args.markdown)


if __name__ == "__main__":
    main()
