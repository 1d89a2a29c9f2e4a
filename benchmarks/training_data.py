"""Method checks on training data only, never on an evaluation split: where the `compare` tables leave a question
(which method leads a cell, whether a setting helps), this measures it on data the evaluation does not use.

- mamba-shakespeare and mamba2-shakespeare: bits per byte on 200 windows of Tiny Shakespeare's training split
  outside the 64 KiB the calibration draws from (bytes 100,000 to 151,400 of input.txt; needs the data directory);
- typeseg: agreement with the FP labels on typeseg's calibration files (real files outside the evaluation corpus).

Each cell: MambaQuant at each smoothing strength `alpha`, then the baselines, then the `--variants` of what
mambaquant+ adds to the paper's recipe, one step at a time (VARIANTS; `--site-bits h=8` adds a variant with those
activation bits by site over mambaquant+'s clipping and ordering: a sensitivity probe).

    python benchmarks/training_data.py shakespeare|shakespeare2|typeseg [--cells w4a16:none,w8a8:token]
        [--alphas 0.5,0.25,0] [--methods rtn,quamba] [--variants clip,clip+order,mambaquant+] [--site-bits h=8]
"""

import argparse

import torch

import mambaquant
from mambaquant.calibration import TYPESEG_CALIBRATION
from mambaquant.cli import site_bits_value
from mambaquant.data import shared_data_dir
from mambaquant.evaluation.text import bits_per_byte
from mambaquant.loaders.typeseg import typeseg_tokens
from mambaquant.methods import PRESETS

BASELINES = ("rtn", "smoothquant", "quarot", "quamba")
MAMBA2_BASELINES = BASELINES + ("quamba2",)
MODELS = {"shakespeare": "mamba-shakespeare", "shakespeare2": "mamba2-shakespeare", "typeseg": "typeseg"}
VARIANTS = {"clip": {"method": "mambaquant+", "site_bits": {}},  # clipping searched
            "clip+order": {"method": "mambaquant+", "site_bits": {}, "act_order": True},  # and GPTQ in activation order
            "mambaquant+": {"method": "mambaquant+"}}  # clipping and mixed precision by site (at 4-bit activations)


def shakespeare_metric():
    data = shared_data_dir()
    if data is None:
        raise SystemExit("needs the data directory (../shared/data or MAMBAQUANT_DATA) for the training split")
    held_out = (data / "tinyshakespeare" / "input.txt").read_bytes()[100_000 : 100_000 + 257 * 200]
    return lambda model: bits_per_byte(model, held_out)[0]


def typeseg_metric(reference):
    files = sorted(p for p in TYPESEG_CALIBRATION.iterdir() if p.name != "SOURCES.md")
    inputs = [typeseg_tokens(p.read_bytes())[None] for p in files]
    with torch.no_grad():
        labels = [reference(x)[0].argmax(-1) for x in inputs]

    @torch.no_grad()
    def agreement(model):
        same = sum((model(x)[0].argmax(-1) == y).sum().item() for x, y in zip(inputs, labels))
        return 100 * same / sum(len(y) for y in labels)

    return agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("--cells", default="w4a16:none,w4a8:tensor,w8a8:tensor,w8a8:token")
    parser.add_argument("--alphas", default="0.5,0.25,0")
    parser.add_argument("--methods", help="the baselines to run (default: all of the model's block kind)")
    parser.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--site-bits", action="append", default=[], help="SITE=BITS,... (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fp = mambaquant.load(MODELS[args.model])
    text = args.model != "typeseg"
    metric = shakespeare_metric() if text else typeseg_metric(fp)
    default = MAMBA2_BASELINES if args.model == "shakespeare2" else BASELINES
    baselines = [m for m in args.methods.split(",") if m] if args.methods is not None else default
    variants = [(name, VARIANTS[name]) for name in args.variants.split(",") if name]
    variants += [(f"site_bits {text}", {"method": "mambaquant+", "site_bits": site_bits_value(text)})
                 for text in args.site_bits]
    print(f"| cell | method | alpha | {'bits per byte' if text else 'agreement %'} |")
    print("|---|---|---:|---:|")
    print(f"| fp | fp | - | {metric(fp):.4f} |", flush=True)
    for cell in args.cells.split(","):
        bits, granularity = cell.split(":")
        w_bits, a_bits = PRESETS[bits]
        granularity = None if granularity == "none" else granularity
        runs = [("mambaquant", {"alpha": float(alpha)}) for alpha in args.alphas.split(",") if alpha]
        runs += [(method, {"method": method}) for method in baselines] + variants
        for label, options in runs:
            options = {"method": "mambaquant", **options}
            model = mambaquant.quantize(fp, w_bits=w_bits, a_bits=a_bits, act_granularity=granularity, **options)
            alpha = options.get("alpha", "default")
            print(f"| {cell} | {label} | {alpha} | {metric(model):.4f} |", flush=True)


if __name__ == "__main__":
    main()
