"""The `mambaquant` command line: a thin layer over the Python API. Bad input exits 2 with one line."""

import argparse
import json
import sys

import torch

from . import __version__
from .errors import InputError


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def cmd_zoo(args) -> None:
    from .zoo import ZOO, card

    rows = []
    for name, entry in ZOO.items():
        final = card(name)["final"]
        rows.append({"name": name, "task": entry.task, "metric": final["metric"], "value": final["value"],
                     "parameters": card(name)["parameters"], "description": entry.description})
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(f"{row['name']:18s} {row['metric']:>14s} {row['value']:>7}  {row['parameters']:>9,} params  "
              f"{row['description']}")


def cmd_eval(args) -> None:
    from . import load
    from .evaluation import evaluate

    model = load(args.source)
    result = evaluate(model, args.source, max_samples=args.eval_samples)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{result.model}: {result.metric} = {result.value:.4f} ({result.protocol}; {result.samples} samples)")


def cmd_generate(args) -> None:
    from . import load
    from .runtime import MambaLM
    from .tokenizer import tokenizer_for

    model = load(args.source)
    if not isinstance(model, MambaLM):
        raise InputError(f"{args.source}: generate needs a language model, got a {type(model).__name__}")
    tokenizer = tokenizer_for(model.config.vocab_size, args.tokenizer)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise InputError("the prompt is empty; expected some text after --prompt")
    generator = torch.Generator().manual_seed(args.seed)
    new = model.generate(torch.tensor([prompt]), args.max_new_tokens, args.temperature, args.top_k, generator)
    print(args.prompt + tokenizer.decode(new[0].tolist()))


def build_parser() -> Parser:
    parser = Parser(prog="mambaquant", description="Post-training quantization of Mamba models.")
    parser.add_argument("--version", action="version", version=f"mambaquant {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    zoo = commands.add_parser("zoo", help="list the embedded models")
    zoo.add_argument("--json", action="store_true", help="print JSON")
    zoo.set_defaults(run=cmd_zoo)

    evaluate = commands.add_parser("eval", help="evaluate a model with its protocol")
    evaluate.add_argument("source", help="embedded model name, model directory or checkpoint file")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--eval-samples", type=positive_int, help="evaluate on the first N samples only")
    evaluate.set_defaults(run=cmd_eval)

    generate = commands.add_parser("generate", help="generate text from a language model")
    generate.add_argument("source", help="embedded model name, model directory or checkpoint file")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=positive_int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    generate.add_argument("--top-k", type=positive_int)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--tokenizer", help="tokenizer.json for non-byte vocabularies")
    generate.set_defaults(run=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except InputError as e:
        print(f"mambaquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mambaquant: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
