"""The `mambaquant` command line: a thin layer over the Python API. Bad input exits 2 with one line."""

import argparse
import json
import math
import os
import signal
import sys
import warnings
from pathlib import Path

import torch

from . import __version__
from .errors import InputError

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAX_SEED = 2**63 - 1
SOURCE_HELP = "embedded model name, model directory, checkpoint file or Hugging Face hub id (org/name[@revision])"
EVAL_DATA_HELP = ("your own labelled data, top-1 and agreement with FP: an .npz, .pt or .safetensors file with "
                  "'inputs' and 'labels', or a directory of class subdirectories of images")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum, refused as "expected {what}"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = integer_at_least(1, "a positive integer")
non_negative_int = integer_at_least(0, "an integer of 0 or more")


def seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed from 0 to {MAX_SEED}, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range; expected 0 to {MAX_SEED}")
    return value


def temperature_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite temperature > 0, or 0 for greedy decoding; got {text!r}")
    return value


def add_revision_option(parser) -> None:
    parser.add_argument("--revision", metavar="REV",
                        help="a branch, tag or commit of a Hugging Face hub id SOURCE (the same as SOURCE@REV)")


def apply_revision(args) -> None:
    """--revision REV: the hub id SOURCE becomes SOURCE@REV, the form every command and the Python API take."""
    if getattr(args, "revision", None) is not None:
        from .loaders import source_at_revision

        args.source = source_at_revision(args.source, args.revision)


def path_value(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def source_bytes(source: str) -> int:
    """The size of a source on disk: what its quantized output will need at most."""
    from .loaders import resolve_source
    from .zoo import MODELS_DIR

    kind, value = resolve_source(source)
    path = MODELS_DIR / value if kind == "zoo" else value
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files if p.exists())


def bit_width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width from 2 to 8, or 16 for none, got {text!r}") from None
    if not (2 <= value <= 8 or value == 16):
        raise argparse.ArgumentTypeError(f"bit width {value} is not supported; expected 2 to 8, or 16 for none")
    return value


def cmd_quantize(args) -> None:
    from . import load, quantize, save
    from .evaluation import evaluate
    from .loaders import check_source
    from .outputs import check_output_dir

    check_source(args.source)
    if args.stream:
        return quantize_streamed_command(args)
    if args.out is not None:
        check_output_dir(args.out, args.overwrite, [args.source], source_bytes(args.source))
    if args.eval_data is not None and args.no_eval:
        raise InputError("--eval-data and --no-eval: expected one of them")
    if args.export == "gguf" and (args.out is None or args.target != "llama.cpp"):
        raise InputError("--export gguf writes model.gguf into the --out directory of a model quantized for "
                         "llama.cpp: expected --out DIR and --target llama.cpp")
    if args.export == "compressed-tensors" and (args.out is None or args.target != "vllm"):
        raise InputError("--export compressed-tensors writes the vLLM checkpoint into --out/vllm of a model quantized "
                         "for vLLM: expected --out DIR and --target vllm")
    eval_data = eval_data_of(args)
    model = load(args.source)
    quantized = quantize(model, method=args.method, w_bits=args.w_bits, a_bits=args.a_bits, calib=args.calib,
                         act_granularity=args.act_granularity, seed=args.seed, calib_samples=args.calib_samples,
                         calib_len=args.calib_len, progress=not args.json, tokenizer=args.tokenizer,
                         backend=args.backend, **method_options(args))
    report = quantized.quantization_report
    output = {"report": report.to_dict()}
    lines = [report.summary()] + ([f"  {line}" for line in report.site_lines()] if args.explain else [])
    card_notes = [f"source: {args.source}"]
    if not args.no_eval:
        fp = evaluate(model, args.source, max_samples=args.eval_samples, eval_data=eval_data)
        result = evaluate(quantized, args.source, max_samples=args.eval_samples, reference=model, eval_data=eval_data)
        output.update({**result.to_dict(), "fp_value": fp.value, "method": args.method, "w_bits": args.w_bits,
                       "a_bits": args.a_bits, "backend": args.backend})
        agreement = f", agreement with FP {result.agreement:.2f} %" if result.agreement is not None else ""
        lines.append(f"{result.metric}: {result.value:.4f} quantized, {fp.value:.4f} full precision{agreement} "
                     f"({result.protocol}; {result.samples} samples; backend {args.backend})")
        card_notes.append(lines[-1])
    if args.out is not None:
        check_output_dir(args.out, args.overwrite, [args.source])
        def write_engine(staging):
            if args.export == "gguf":
                from .exporters.gguf import export_gguf

                export_gguf(quantized, staging / "model.gguf", tokenizer=export_tokenizer(quantized, args))
            else:
                from .exporters.compressed_tensors import export_compressed_tensors

                export_compressed_tensors(quantized, staging / "vllm", tokenizer_dir=tokenizer_dir_of(args.source))

        if args.export == "compressed-tensors":  # refused before anything is written
            from .exporters.compressed_tensors import export_problems
            from .exporters.rules import summary

            if export_problems(quantized):
                raise InputError(f"vLLM cannot serve this model as quantized: {summary(export_problems(quantized))}")
        save(quantized, args.out, overwrite=args.overwrite, notes=card_notes, shard_size=args.shard_size * 2**20,
             extra=write_engine if args.export else None)
        output["out"] = args.out
        engine = {"gguf": " (model.gguf: run it in llama.cpp)",
                  "compressed-tensors": f" (serve it with vLLM: vllm serve {args.out}/vllm)"}
        lines.append(f"wrote {args.out}" + engine.get(args.export, ""))
    print(json.dumps(output) if args.json else "\n".join(lines))


def method_options(args) -> dict:
    """The `QuantConfig` options of `quantize` beyond method, bits and granularity."""
    return {"head_clusters": args.head_clusters, "channel_clusters": args.channel_clusters,
            "calib_dtype": args.calib_dtype, "clip_search": args.clip_search, "act_order": args.act_order,
            "site_bits": args.site_bits, "target": args.target, "weight_group_size": args.weight_group_size,
            "scope": args.scope, "decide": args.decide, "kv_bits": args.kv_bits,
            "static_fallback": args.static_fallback, "smooth": args.smooth}


def export_tokenizer(model, args):
    """The tokenizer.json a GGUF export carries: --tokenizer, else the source's own; None for a byte-level model
    (llama.cpp then takes token ids, as do our byte-level models)."""
    from .tokenizer import own_tokenizer

    if 256 <= model.config.vocab_size < 512 and args.tokenizer is None:
        return None
    return args.tokenizer or own_tokenizer(args.source)


def tokenizer_dir_of(source) -> Path | None:
    """The directory whose tokenizer files an export copies: the source's, where it is a local directory."""
    path = Path(str(source))
    return path if path.is_dir() else None


def cmd_export(args) -> None:
    """`export SOURCE --to gguf --out FILE`: a model quantized with --target llama.cpp, or with --dtype f32 any
    full-precision language model llama.cpp runs, as a GGUF file; `export SOURCE --to compressed-tensors --out DIR`:
    a model quantized with --target vllm as the checkpoint vLLM serves."""
    from . import load
    from .exporters.gguf import export_gguf
    from .loaders import check_source

    check_source(args.source)
    if args.to == "compressed-tensors":
        return export_vllm(args)
    model = load(args.source)
    quantized = hasattr(model, "quantization_report")
    if quantized and args.dtype is not None:
        raise InputError(f"{args.source} is quantized: its codes go to the GGUF file as they are; expected no --dtype")
    if not quantized and args.dtype is None:
        raise InputError(f"{args.source} is a full-precision model: pass --dtype f32 for a float export, or quantize "
                         "it with --target llama.cpp first")
    tokenizer = export_tokenizer(model, args)
    path = export_gguf(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    vocabulary = f"tokenizer {tokenizer}" if tokenizer else f"no tokenizer: llama.cpp takes token ids 0..{model.config.vocab_size - 1}"
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB; {vocabulary})")


def export_vllm(args) -> None:
    from . import load
    from .exporters.compressed_tensors import export_compressed_tensors, export_problems
    from .exporters.rules import summary
    from .outputs import check_output_dir

    if args.dtype is not None:
        raise InputError("--to compressed-tensors writes a quantized model's codes as they are; expected no --dtype")
    check_output_dir(args.out, args.overwrite, [args.source])
    model = load(args.source)
    problems = export_problems(model)
    if problems:
        raise InputError(f"{args.source}: vLLM cannot serve it as quantized: {summary(problems)}")
    path = export_compressed_tensors(model, args.out, tokenizer_dir=tokenizer_dir_of(args.source),
                                     overwrite=args.overwrite, sources=[args.source])
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MiB; compressed-tensors, {model.quantization_report.config['method']} "
          f"w{model.quantization_report.config['w_bits']}a{model.quantization_report.config['a_bits']}): "
          f"vllm serve {path}")


def site_bits_value(text: str) -> dict:
    """--site-bits h=8,x=8 -> {"h": 8, "x": 8} (the kinds and widths are checked by QuantConfig); none -> {}."""
    if text == "none":
        return {}
    pairs = [part.partition("=") for part in text.split(",") if part]
    if not pairs or any(not sep or not kind or not bits.isdigit() for kind, sep, bits in pairs):
        raise argparse.ArgumentTypeError(f"expected SITE=BITS pairs separated by commas, e.g. h=8,x=8; got {text!r}")
    return {kind: int(bits) for kind, _, bits in pairs}


def quantize_streamed_command(args) -> None:
    """`quantize --stream`: block by block from a safetensors checkpoint into --out; no evaluation in the same run
    (the full-precision model is not held): `mambaquant eval OUT` measures the result."""
    from . import quantize
    from .outputs import check_output_dir

    if args.out is None:
        raise InputError("--stream writes the quantized model block by block: expected --out DIR")
    if args.eval_data is not None or args.eval_samples is not None:
        raise InputError("--stream does not evaluate (the full-precision model is never held whole); run "
                         "`mambaquant eval OUT` afterwards, without --eval-data / --eval-samples here")
    if args.backend != "fake":
        raise InputError("--stream writes a checkpoint; --backend applies when it is loaded (mambaquant eval OUT "
                         "--backend int8)")
    check_output_dir(args.out, args.overwrite, [args.source])
    out = quantize(args.source, method=args.method, w_bits=args.w_bits, a_bits=args.a_bits, calib=args.calib,
                   act_granularity=args.act_granularity, seed=args.seed, calib_samples=args.calib_samples,
                   calib_len=args.calib_len, progress=not args.json, tokenizer=args.tokenizer, out=args.out,
                   stream=True, overwrite=args.overwrite, shard_size=args.shard_size * 2**20,
                   **method_options(args))
    card = (out / "MODEL_CARD.md").read_text()
    if args.json:
        print(json.dumps({"out": str(out), "model_card": card}))
    else:
        print(f"{card}wrote {out} (evaluate it with: mambaquant eval {out})")


def eval_data_of(args):
    """--eval-data read (its first --eval-samples), before any model is loaded; None without it."""
    if args.eval_data is None:
        return None
    from .evaluation.user_data import user_data

    return user_data(args.eval_data, args.eval_samples, "--eval-data")


def task_file(text: str) -> tuple[str, str]:
    task, _, file = text.partition("=")
    if not task.strip() or not file.strip():
        raise argparse.ArgumentTypeError(f"expected TASK=FILE, got {text!r}")
    return task.strip(), file


def add_lm_eval_options(parser) -> None:
    parser.add_argument("--lm-eval", metavar="TASKS",
                        help="lm-evaluation-harness tasks, comma-separated (names or task YAML files; 'paper' for "
                             "the paper's six zero-shot tasks); needs the eval extra")
    parser.add_argument("--num-fewshot", type=non_negative_int, help="few-shot examples per lm-eval task (default: "
                                                                     "the task's, 0 for most)")
    parser.add_argument("--limit", type=positive_int, help="the first N documents of each lm-eval task (a quick look)")
    parser.add_argument("--lm-eval-data", type=task_file, action="append", metavar="TASK=FILE",
                        help="read an lm-eval task's evaluation split from a local .jsonl/.json/.csv/.parquet file")
    parser.add_argument("--lm-eval-include", type=path_value, action="append", metavar="DIR",
                        help="a folder of lm-eval task YAMLs (relative data files are read beside each YAML)")
    parser.add_argument("--trust-task-code", action="store_true",
                        help="let your task YAMLs import the Python they name (!function): only for files you trust")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch in lm-eval tasks")


def comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def cmd_compare(args) -> None:
    from .compare import compare, default_methods, format_table, plan, to_markdown, write_json
    from .methods.config import FULL_PRECISION, SCOPES
    from .loaders import check_source
    from .outputs import check_output_file, write_atomic
    from .zoo import ZOO, ZOO_PREFIX

    scopes = args.scope or (SCOPES if args.kv_bits == FULL_PRECISION else ("all",))
    runs = plan(args.methods or default_methods(args.kv_bits), args.bits, args.granularity, args.target, scopes,
                args.kv_bits)  # bad options fail before loading
    lm_eval = lm_eval_config(args)
    for path in (args.json, args.markdown):
        if path is not None:
            check_output_file(path)
    if args.json is not None and args.json == args.markdown:
        raise InputError(f"{args.json}: given for both --json and --markdown; expected two different files")
    sources = args.sources or [f"{ZOO_PREFIX}{name}" for name in ZOO]
    for source in sources:
        check_source(source)
    data = {"wikitext2": args.wikitext, "lambada": args.lambada}
    eval_data = eval_data_of(args)
    if args.eval_samples:
        print(f"quick look: every evaluation uses a fixed subset of {args.eval_samples} samples, not the full set")
    print(f"up to {len(runs)} runs x {len(sources)} model(s): {', '.join(sources)}", flush=True)
    rows, failure = [], None
    for source in sources:
        try:
            rows += compare(source, args.methods, args.bits, args.granularity, args.tasks, args.eval_samples,
                            args.calib, args.calib_samples, args.calib_len, args.seed, data, args.tokenizer,
                            progress=True, lm_eval=lm_eval, eval_data=eval_data, target=args.target,
                            scopes=args.scope, kv_bits=args.kv_bits)
        except InputError as e:
            failure = e
            break
    if rows:  # what finished is kept, even when a later source fails
        print(format_table(rows))
        if args.json:
            write_json(args.json, rows)
        if args.markdown:
            write_atomic(args.markdown, to_markdown(rows, "mambaquant " + " ".join(sys.argv[1:])))
    if failure is not None:
        kept = f" (the results of {', '.join(dict.fromkeys(row.model for row in rows))} are kept above)" if rows else ""
        raise InputError(f"{failure}{kept}")


def cmd_analyze(args) -> None:
    from .analysis import AnalysisConfig, analyze

    config = AnalysisConfig(calib=args.calib, calib_samples=args.calib_samples, calib_len=args.calib_len,
                            methods=tuple(args.methods) if args.methods else None, seed=args.seed)
    results = analyze(args.source, args.out, config, overwrite=args.overwrite, progress=True)
    for method, per_bits in results["sqnr"].items():
        for bits, sqnr in per_bits.items():
            print(f"{method} {bits.upper()}: activation SQNR {sqnr['activations_db']:.1f} dB, "
                  f"output SQNR {sqnr['output_db']:.1f} dB")
    print(f"wrote {args.out}: stats.json, summary.md, plots/, index.html")


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


def lm_eval_config(args):
    """The --lm-eval options as an LMEvalConfig, tasks and their data checked (before any model is loaded)."""
    lm_options = {"--num-fewshot": args.num_fewshot, "--limit": args.limit, "--lm-eval-data": args.lm_eval_data,
                  "--lm-eval-include": args.lm_eval_include, "--trust-task-code": args.trust_task_code or None}
    if args.lm_eval is None:
        given = [option for option, value in lm_options.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} apply to lm-eval tasks; expected --lm-eval TASKS as well")
        return None
    from .evaluation.local_tasks import LMEvalConfig, load_tasks

    config = LMEvalConfig(args.lm_eval, args.num_fewshot, args.limit, dict(args.lm_eval_data or []),
                          tuple(args.lm_eval_include or ()), args.batch_size, args.trust_task_code)
    load_tasks(config.tasks, config.data, config.include, config.num_fewshot, config.trust_code)
    if args.limit:
        print(f"quick look: every lm-eval task uses its first {args.limit} documents only, not the full set",
              file=sys.stderr)
    return config


def cmd_eval(args) -> None:
    from . import load
    from .evaluation import evaluate, lm_eval
    from .methods import set_backend

    config = lm_eval_config(args)
    if config is not None and (args.task or args.eval_samples or args.data):
        raise InputError("--task, --eval-samples and --data choose a built-in protocol; with --lm-eval use "
                         "--limit and --lm-eval-data")
    if args.eval_data is not None and (config is not None or args.task or args.data):
        raise InputError("--eval-data is a protocol of its own; expected it without --task, --data and --lm-eval")
    eval_data = eval_data_of(args)
    model = set_backend(load(args.source), args.backend)
    if config is not None:
        rows = lm_eval(model, config, args.source, args.tokenizer, progress=not args.json)
        if args.json:
            print(json.dumps([{"task": task, **result.to_dict()} for task, result in rows]))
            return
        for task, result in rows:
            unit = " %" if result.protocol.endswith(" %") else ""
            print(f"{result.model}: {task} {result.metric} = {result.value:.2f}{unit} ({result.protocol}; "
                  f"{result.samples} samples)")
        return
    result = evaluate(model, args.source, max_samples=args.eval_samples, task=args.task, data=args.data,
                      tokenizer=args.tokenizer, eval_data=eval_data)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{result.model}: {result.metric} = {result.value:.4f} ({result.protocol}; {result.samples} samples)")


def cmd_generate(args) -> None:
    from . import load
    from .runtime import MambaLM
    from .tokenizer import own_tokenizer, tokenizer_for

    model = load(args.source)
    if not isinstance(model, MambaLM):
        raise InputError(f"{args.source}: generate needs a language model, got a {type(model).__name__}")
    tokenizer = tokenizer_for(model.config.vocab_size, args.tokenizer or own_tokenizer(args.source))
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise InputError("the prompt is empty; expected some text after --prompt")
    generator = torch.Generator().manual_seed(args.seed)
    new = model.generate(torch.tensor([prompt]), args.max_new_tokens, args.temperature, args.top_k, generator)
    sys.stdout.buffer.write(os.fsencode(args.prompt) + tokenizer.decode(new[0].tolist()).encode() + b"\n")


def build_parser() -> Parser:
    parser = Parser(prog="mambaquant", description="Post-training quantization of Mamba models.")
    parser.add_argument("--version", action="version", version=f"mambaquant {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    zoo = commands.add_parser("zoo", help="list the embedded models")
    zoo.add_argument("--json", action="store_true", help="print JSON")
    zoo.set_defaults(run=cmd_zoo)

    from .quant.linear import BACKENDS

    evaluate = commands.add_parser("eval", help="evaluate a model with its protocol")
    evaluate.add_argument("source", help=SOURCE_HELP)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--eval-samples", type=positive_int, help="evaluate on the first N samples only")
    evaluate.add_argument("--task", help="evaluation task (default: the model's main one)")
    evaluate.add_argument("--data", help="data file for GPT-NeoX LM tasks (WikiText-2 raw test or LAMBADA jsonl)")
    evaluate.add_argument("--tokenizer", help="tokenizer.json for BPE models (default: GPT-NeoX's)")
    evaluate.add_argument("--eval-data", type=path_value, metavar="PATH", help=EVAL_DATA_HELP)
    evaluate.add_argument("--backend", choices=BACKENDS, default="fake",
                          help="for a quantized model: simulated (fake) or int8 matrix products")
    add_lm_eval_options(evaluate)
    add_revision_option(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    from .calibration import CALIBRATION_SETS
    from .methods import GRANULARITIES, METHODS
    from .methods.config import CALIB_DTYPES, SCOPES, TARGETS

    quantize = commands.add_parser("quantize", help="quantize a model with a method, print what was done, evaluate")
    quantize.add_argument("source", help=SOURCE_HELP)
    quantize.add_argument("--method", choices=METHODS, default="mambaquant")
    quantize.add_argument("--w-bits", type=bit_width, default=8, help="weight bits, 2-8 (16: not quantized)")
    quantize.add_argument("--a-bits", type=bit_width, default=8, help="activation bits, 2-8 (16: not quantized)")
    quantize.add_argument("--act-granularity", choices=GRANULARITIES,
                          help="activation scales: static per tensor, dynamic per token, or chosen per site (auto); "
                               "default auto for mambaquant, tensor for the baselines")
    calib_help = (f"calibration set ({', '.join(sorted(CALIBRATION_SETS))}), a training text file, a "
                  ".pt/.npz/.npy/.safetensors file of inputs or a directory of class subdirectories of images "
                  "(default: the model's set)")
    quantize.add_argument("--calib", help=calib_help)
    quantize.add_argument("--calib-samples", type=positive_int, default=32)
    quantize.add_argument("--calib-len", type=positive_int, help="calibration sequence length (text)")
    quantize.add_argument("--seed", type=seed_value, default=0)
    quantize.add_argument("--eval-samples", type=positive_int, help="evaluate on a fixed subset only")
    quantize.add_argument("--eval-data", type=path_value, metavar="PATH", help=EVAL_DATA_HELP)
    quantize.add_argument("--no-eval", action="store_true", help="print the summary only")
    quantize.add_argument("--json", action="store_true", help="print one JSON object")
    quantize.add_argument("--explain", action="store_true",
                          help="print each activation site's quantizer and why it got that granularity, clipping and "
                               "bits (the JSON report and a saved model's MODEL_CARD.md always hold them)")
    quantize.add_argument("--tokenizer", help="tokenizer.json for text calibration of a BPE model (default GPT-NeoX)")
    quantize.add_argument("--backend", choices=BACKENDS, default="fake",
                          help="run the quantized linears simulated in float32 (fake) or as int8 matrix products")
    quantize.add_argument("--head-clusters", type=positive_int,
                          help="quamba2 (Mamba-2): clusters of heads per B/C group sharing scan-input scales (4)")
    quantize.add_argument("--channel-clusters", type=positive_int,
                          help="quamba2 (Mamba-2): clusters of channels per head cluster (4)")
    quantize.add_argument("--out", type=path_value, help="write the quantized model to this directory (reload with mambaquant.load)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    quantize.add_argument("--calib-dtype", choices=CALIB_DTYPES, default="float32",
                          help="hold the calibration activations between blocks in this dtype (bfloat16: half the "
                               "memory for long calibration sets; each block still computes in float32)")
    quantize.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                          help="search clipping ratios per weight channel and per activation site on the calibration "
                               "data (default: on for mambaquant+, off otherwise)")
    quantize.add_argument("--act-order", action="store_true",
                          help="GPTQ: quantize the columns by decreasing input energy")
    quantize.add_argument("--decide", action="store_true",
                          help="decide each optional part of the recipe (auto's granularity, clipping search, "
                               "mambaquant+'s 8-bit SSM sites, smoothing) by 4-fold cross-validation on the "
                               "calibration set: dropped where it does nothing or raises the held-back output error "
                               "beyond 2 standard errors (up to 4 runs of the recipe per part)")
    quantize.add_argument("--static-fallback", action=argparse.BooleanOptionalAction, default=None,
                          help="where one static range cannot hold a site's calibration tokens (the median token "
                               "losing over half its signal), use per-position ranges, 8 bits or, failing those, "
                               "per-token ranges there, and say so (default: on for mambaquant+; every method's "
                               "report names such sites)")
    quantize.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=True,
                          help="mambaquant / mambaquant+: their smoothing (--no-smooth: their rotations alone; "
                               "--decide tries it)")
    quantize.add_argument("--site-bits", type=site_bits_value, metavar="SITE=BITS,...",
                          help="activation bits by site kind over --a-bits, e.g. h=8,x=8 (mixed precision), or none "
                               "(--a-bits everywhere); default: mambaquant+'s own rule, none for the others")
    quantize.add_argument("--weight-group-size", type=non_negative_int, default=0, metavar="N",
                          help="weight scales per group of N inputs (0: per output channel; a layer whose input width "
                               "N does not divide keeps per-channel scales)")
    quantize.add_argument("--target", choices=TARGETS, default="runtime",
                          help="where the model will run: our runtime (every transform and site), llama.cpp (only "
                               "what it executes: transforms fused into the weights, Q8_0 / Q4_0 weights, its own "
                               "int8 inputs per 32 values, simulated exactly), or vllm (int8 / int4 weights of the "
                               "linears vLLM quantizes, int8 inputs static per tensor or per token, online Hadamards "
                               "at out_proj / down_proj only, simulated exactly)")
    quantize.add_argument("--scope", choices=SCOPES, default="all",
                          help="which activations to quantize: all (every site the method quantizes: the linear "
                               "layers' inputs and the conv, scan and state of the Mamba layers) or linear (the linear "
                               "layers' inputs only, the rest in float, as other tools do)")
    quantize.add_argument("--kv-bits", type=bit_width, default=16,
                          help="the KV cache's bits (the attention's keys and values), 2-8, whatever --a-bits is: "
                               "dynamic, one range per position and head; quarot and mambaquant turn each query and "
                               "key head by a Hadamard first (default 16: in float)")
    quantize.add_argument("--export", choices=("gguf", "compressed-tensors"),
                          help="also write the model for its engine into --out: model.gguf for --target llama.cpp, "
                               "vllm/ (compressed-tensors) for --target vllm")
    quantize.add_argument("--stream", action="store_true",
                          help="read a safetensors language model one block at a time and write --out as it goes "
                               "(for models larger than memory; the same result as in memory; no evaluation)")
    quantize.add_argument("--shard-size", type=positive_int, default=2048, metavar="MIB",
                          help="largest output shard in MiB (Hugging Face shards + index above it; default 2048)")
    add_revision_option(quantize)
    quantize.set_defaults(run=cmd_quantize)

    from .compare import DEFAULT_BITS

    compare = commands.add_parser("compare", help="every method x bit width x granularity against full precision")
    compare.add_argument("sources", nargs="*", help="embedded model names, model directories, checkpoint files or "
                                                    "Hugging Face hub ids (org/name[@revision]) (default: the "
                                                    "embedded Mamba-1, Vim and tagger models)")
    compare.add_argument("--methods", type=comma_list, default=None,
                         help="comma-separated (default: every method for the model's block kind)")
    compare.add_argument("--bits", type=comma_list, default=list(DEFAULT_BITS),
                         help=f"comma-separated presets (default: {','.join(DEFAULT_BITS)})")
    compare.add_argument("--granularity", type=comma_list, default=list(GRANULARITIES),
                         help="activation granularities: tensor (static), token (dynamic), auto (MambaQuant's per-site "
                              "choice); default all three")
    compare.add_argument("--tasks", type=comma_list, help="built-in evaluation tasks (default: every one that "
                                                          "applies; none with --lm-eval)")
    compare.add_argument("--eval-samples", type=positive_int, help="evaluate on a fixed subset (a quick look)")
    compare.add_argument("--eval-data", type=path_value, metavar="PATH",
                         help=EVAL_DATA_HELP + " (then no built-in task unless --tasks)")
    compare.add_argument("--calib", help=calib_help)
    compare.add_argument("--calib-samples", type=positive_int, default=32)
    compare.add_argument("--calib-len", type=positive_int, help="calibration sequence length (text)")
    compare.add_argument("--seed", type=seed_value, default=0)
    compare.add_argument("--wikitext", help="WikiText-2 raw test file (default: the data directory's)")
    compare.add_argument("--lambada", help="LAMBADA OpenAI test jsonl (default: the data directory's)")
    compare.add_argument("--tokenizer", help="tokenizer.json for BPE models (default: GPT-NeoX's)")
    compare.add_argument("--json", type=path_value, help="write the rows as a JSON list to this file")
    compare.add_argument("--markdown", type=path_value, help="write the table as Markdown to this file")
    compare.add_argument("--target", choices=TARGETS, default="runtime",
                         help="llama.cpp: every run restricted to what llama.cpp executes and simulated exactly "
                              "(presets w8a8 -> Q8_0, w4a8 -> Q4_0; --granularity does not apply); vllm: the same "
                              "for vLLM (presets w8a8, w4a16; granularities tensor and token)")
    compare.add_argument("--scope", type=comma_list, default=None, metavar="SCOPES",
                         help="all and/or linear (see quantize --scope; default: all, and for a hybrid both)")
    compare.add_argument("--kv-bits", type=bit_width, default=16,
                         help="every run's KV cache at these bits (see quantize --kv-bits; default: the methods that "
                              "quantize one, scope all)")
    add_lm_eval_options(compare)
    compare.set_defaults(run=cmd_compare)

    analyze = commands.add_parser("analyze", help="outliers, the scan's heavy tails, what each transform does to "
                                                  "them and each method's SQNR: stats, plots, index.html")
    analyze.add_argument("source", help=SOURCE_HELP)
    analyze.add_argument("--out", type=path_value, required=True, help="directory to write (refused if it exists, see --overwrite)")
    analyze.add_argument("--calib", help=calib_help)
    analyze.add_argument("--calib-samples", type=positive_int, default=32)
    analyze.add_argument("--calib-len", type=positive_int, help="calibration sequence length (text)")
    analyze.add_argument("--methods", type=comma_list, default=None,
                         help="comma-separated methods whose SQNR to measure (default: every quantizing method for "
                              "the model's block kind)")
    analyze.add_argument("--seed", type=seed_value, default=0)
    analyze.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    add_revision_option(analyze)
    analyze.set_defaults(run=cmd_analyze)

    export = commands.add_parser("export", help="write a model for an engine: a GGUF file for llama.cpp, a "
                                                 "compressed-tensors directory for vLLM")
    export.add_argument("source", help="a model quantized with --target llama.cpp or --target vllm (or, with --dtype "
                                       f"f32, any full-precision language model for gguf: {SOURCE_HELP})")
    export.add_argument("--to", choices=("gguf", "compressed-tensors"), required=True,
                        help="the format (gguf: llama.cpp; compressed-tensors: vLLM)")
    export.add_argument("--out", type=path_value, required=True,
                        help="the file to write (FILE.gguf), or the directory (compressed-tensors)")
    export.add_argument("--dtype", choices=("f32",), help="a float export of a full-precision model")
    export.add_argument("--tokenizer", help="tokenizer.json to write as the GGUF vocabulary (default: the source's own; "
                                            "none for a byte-level model)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_revision_option(export)
    export.set_defaults(run=cmd_export)

    generate = commands.add_parser("generate", help="generate text from a language model")
    generate.add_argument("source", help=SOURCE_HELP)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=positive_int, default=200)
    generate.add_argument("--temperature", type=temperature_value, default=0.8, help="0 for greedy decoding")
    generate.add_argument("--top-k", type=positive_int)
    generate.add_argument("--seed", type=seed_value, default=0)
    generate.add_argument("--tokenizer", help="tokenizer.json for non-byte vocabularies")
    add_revision_option(generate)
    generate.set_defaults(run=cmd_generate)
    return parser


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised like KeyboardInterrupt so that every clean-up on the way out runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def on_signal(signum, frame) -> None:
    for handled in HANDLED_SIGNALS:
        signal.signal(handled, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. A bad input is one line on stderr and exit 2; a signal, one line and 128 + its number.
    Warnings from dependencies are held back: shown as single lines after a success, dropped after a failure."""
    previous = {handled: signal.signal(handled, on_signal) for handled in HANDLED_SIGNALS}
    try:
        return run(build_parser().parse_args(argv))
    finally:  # a caller in the same process (a test, a notebook) gets its own handlers back
        for handled, handler in previous.items():
            signal.signal(handled, handler)


def run(args) -> int:
    with warnings.catch_warnings(record=True) as caught:
        try:
            apply_revision(args)
            args.run(args)
        except InputError as e:
            return fail(f"error: {one_line(e)}", 2)
        except OSError as e:
            return fail(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or one_line(e)}", 2)
        except MemoryError:
            return fail("error: out of memory; expected a smaller model, batch or calibration set", 2)
        except KeyboardInterrupt:
            return fail("interrupted", 128 + signal.SIGINT)
        except Terminated as e:
            return fail(f"terminated by {signal.Signals(e.signum).name}", 128 + e.signum)
    for message in dict.fromkeys(one_line(w.message) for w in caught):
        print(f"mambaquant: warning: {message}", file=sys.stderr)
    return 0


def fail(message: str, code: int) -> int:
    print(f"mambaquant: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
