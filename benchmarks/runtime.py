"""Prefill latency, peak memory and decoding speed: our runtime against transformers (its CPU paths), both fp32,
batch 1, all logits returned, on random-initialised models of the mamba-130m and mamba2-130m configurations and
of two hybrids: a granite-4.0-h-350m-like configuration (Mamba-2 layers with a few attention layers, dense MLPs,
muP multipliers) and a Nemotron-H-like one at the same scale (single-sublayer Mamba-2, attention and squared-ReLU
MLP blocks, n_groups 8).

Every measurement runs in a fresh worker process, so peak memory (RSS above the loaded model, the warm-up run
included) is its own;
the ours/transformers pairs alternate within one run, so their ratio is measured under the same conditions.
Decoding: greedy `generate` of --decode-tokens tokens after a 16-token prompt, tokens per second.

    python benchmarks/runtime.py [--archs mamba1 mamba2 granite nemotron] [--lengths 128 512 1024] [--repeats 3]
                                 [--markdown FILE]
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
GRANITE_LAYERS = ["mamba"] * 28
for index in (5, 15, 25):
    GRANITE_LAYERS[index] = "attention"
NEMOTRON_PATTERN = list("M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-")  # Nemotron-H's order of Mamba-2, MLP, attention
CONFIGS = {  # name -> (label, transformers class prefix, config fields)
    # state-spaces/mamba-130m-hf and state-spaces/mamba2-130m
    "mamba1": ("mamba-130m", "Mamba", dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280)),
    "mamba2": ("mamba2-130m", "Mamba2", dict(hidden_size=768, num_hidden_layers=24, vocab_size=50288,
                                              state_size=128, head_dim=64, num_heads=24, n_groups=1,
                                              tie_word_embeddings=True)),
    # granite-4.0-h-350m's shapes: 768 wide, 28 layers of which 3 attention (12 heads, 4 KV heads, no RoPE), Mamba-2
    # of 48 heads x 32, d_state 128, shared MLP 2048 wide, its multipliers, 100,352 tokens, tied
    "granite": ("granite-4.0-h-350m-like", "GraniteMoeHybrid", dict(
        hidden_size=768, num_hidden_layers=28, layer_types=GRANITE_LAYERS, num_attention_heads=12,
        num_key_value_heads=4, mamba_n_heads=48, mamba_d_head=32, mamba_d_state=128, mamba_n_groups=1,
        num_local_experts=0, shared_intermediate_size=2048, vocab_size=100352, embedding_multiplier=12.0,
        residual_multiplier=0.246, attention_multiplier=0.0078125, logits_scaling=3.0,
        position_embedding_type="nope", tie_word_embeddings=True)),
    # Nemotron-H's block pattern and kinds at the same scale: 34 single-sublayer blocks, Mamba-2 of 24 heads x 64 in
    # 8 groups, d_state 128, attention (12 heads, 4 KV heads, no RoPE), squared-ReLU MLPs 3072 wide
    "nemotron": ("nemotron-h-like", "NemotronH", dict(
        hidden_size=768, layers_block_type=[{"M": "mamba", "-": "mlp", "*": "attention"}[k] for k in NEMOTRON_PATTERN],
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, mamba_num_heads=24, mamba_head_dim=64,
        n_groups=8, ssm_state_size=128, intermediate_size=3072, vocab_size=131072)),
}


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) from /proc/self/status."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak_memory() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def reference_model(arch: str):
    import transformers

    _, prefix, fields = CONFIGS[arch]
    config = getattr(transformers, f"{prefix}Config")(initializer_range=0.02, **fields)
    torch.manual_seed(0)
    return getattr(transformers, f"{prefix}ForCausalLM")(config).eval()


def worker(implementation: str, arch: str, length: int, repeats: int) -> dict:
    """length > 0: prefill of `length` tokens; length < 0: greedy decoding of -length tokens (tokens/s)."""
    import mambaquant

    hf_model = reference_model(arch)
    vocab = hf_model.config.vocab_size
    model = mambaquant.load(hf_model) if implementation == "mambaquant" else hf_model
    if implementation == "mambaquant":
        del hf_model
    ids = torch.randint(0, vocab, (1, abs(length) if length > 0 else 16), generator=torch.Generator().manual_seed(1))
    if length > 0:
        run = (lambda: model(ids)) if implementation == "mambaquant" else (lambda: model(ids, use_cache=False).logits)
    elif implementation == "mambaquant":
        def run():
            return model.generate(ids, -length, temperature=0)
    else:
        def run():
            return model.generate(ids, max_new_tokens=-length, min_new_tokens=-length, do_sample=False)
    with torch.no_grad():
        # the peak is taken over the loaded model from before the warm-up: freed memory that the tuned allocator
        # keeps resident (mambaquant/allocator.py) would otherwise count as part of the model
        reset_peak_memory()
        baseline = memory_mib("VmRSS")
        run()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return {"implementation": implementation, "length": length, "seconds": statistics.median(times),
            "peak_mib_over_model": memory_mib("VmHWM") - baseline}


def measure(implementation: str, arch: str, length: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", implementation, arch, str(length), str(repeats)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--decode-tokens", type=int, default=32, help="0: no decoding row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        implementation, arch, length, repeats = args.worker
        print(json.dumps(worker(implementation, arch, int(length), int(repeats))))
        return

    lines = [
        f"fp32, batch 1, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, median of {args.repeats}",
        "",
        "| configuration | measurement | mambaquant | transformers | speed-up | peak MiB over model, ours | "
        "transformers |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for arch in args.archs:
        name = CONFIGS[arch][0]
        for length in args.lengths + ([-args.decode_tokens] if args.decode_tokens else []):
            ours, theirs = (measure(impl, arch, length, args.repeats) for impl in IMPLEMENTATIONS)
            ratio = theirs["seconds"] / ours["seconds"]
            memory = f"{ours['peak_mib_over_model']:.0f} | {theirs['peak_mib_over_model']:.0f}"
            if length > 0:
                lines.append(f"| {name} | prefill {length} tokens | {ours['seconds']:.3f} s | "
                             f"{theirs['seconds']:.3f} s | {ratio:.2f}x | {memory} |")
            else:
                lines.append(f"| {name} | decode, tokens/s | {-length / ours['seconds']:.1f} | "
                             f"{-length / theirs['seconds']:.1f} | {ratio:.2f}x | {memory} |")
            print(lines[-1], file=sys.stderr)
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
