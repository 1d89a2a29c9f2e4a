"""LAMBADA (OpenAI) through both routes, side by side: the built-in protocol (`mambaquant eval --task lambada`) and
lm-evaluation-harness's lambada_openai task through our adapter, on the same passages, with their time.

    python benchmarks/lm_eval_routes.py [--passages N] [--models mamba-shakespeare,random-130m]

`random-130m` is a random-initialised mamba-130m configuration (24 x 768, GPT-NeoX vocabulary): both routes must
agree on it exactly, its accuracy is 0. Needs the data directory (LAMBADA and the GPT-NeoX tokenizer)."""

import argparse
import tempfile
import time
from pathlib import Path

import mambaquant
from mambaquant.data import shared_data_dir
from mambaquant.evaluation import lm_eval
from mambaquant.evaluation.local_tasks import LMEvalConfig
from mambaquant.evaluation.text import lambada, lambada_passages
from mambaquant.runtime import LMConfig, MambaLM, init_weights
from mambaquant.tokenizer import tokenizer_for


def model_and_tokenizer(name: str, neox: Path):
    if name == "random-130m":
        return init_weights(MambaLM(LMConfig(d_model=768, n_layer=24, vocab_size=50280)), seed=0).eval(), str(neox)
    return mambaquant.load(name), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, help="the first N passages (default: all 5,153)")
    parser.add_argument("--models", default="mamba-shakespeare,random-130m")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    data = shared_data_dir()
    file, neox = data / "lambada" / "lambada_test.jsonl", data / "tokenizer" / "20B_tokenizer.json"
    lines = file.read_text(encoding="utf-8").splitlines()[: args.passages]
    with tempfile.TemporaryDirectory() as folder:
        subset = Path(folder) / "lambada.jsonl"
        subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
        passages = lambada_passages(subset)
        print(f"LAMBADA (OpenAI) test, the first {len(passages)} passages; batch size {args.batch_size} for lm-eval")
        print("| model | route | passages | accuracy % | last-word perplexity | seconds |")
        print("|---|---|---:|---:|---:|---:|")
        for name in args.models.split(","):
            model, tokenizer = model_and_tokenizer(name, neox)
            started = time.perf_counter()
            accuracy, perplexity, count = lambada(model, tokenizer_for(model.config.vocab_size, tokenizer), passages)
            print(f"| {name} | built-in (`--task lambada`) | {count} | {accuracy:.2f} | {perplexity:.6g} | "
                  f"{time.perf_counter() - started:.0f} |", flush=True)
            started = time.perf_counter()
            config = LMEvalConfig("lambada_openai", data={"lambada_openai": str(subset)}, batch_size=args.batch_size)
            (_, result), = lm_eval(model, config, name, tokenizer)
            print(f"| {name} | lm-eval `lambada_openai` | {result.samples} | {result.value:.2f} | "
                  f"{result.extra['perplexity']:.6g} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
