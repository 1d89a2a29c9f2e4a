"""The generality suite (issue 34): small trained Mambas of shapes the embedded models do not have, built with the
public API (`mambaquant.build`) from `ModelConfig` fields, trained here in minutes on CPU, shipped as test fixtures
under tests/data/generality/NAME/ (not in the zoo):

- timeseries: a long-sequence time-series classifier, (N, 187, 1) signals -> 5 classes (how many pulses the
  signal holds, 0 to 4, under noise and baseline wander: the state has to count over the whole signal). A linear
  stem on one channel, 2 Mamba-1 blocks without residual connections or block norms, a final LayerNorm (with
  bias), mean pooling, an MLP head.
- single-token: a single-token classifier: a 32-feature vector flattened into one token (sequence length 1),
  labelled by a fixed random teacher network (6 classes).
- vision: a bidirectional Vision Mamba (Vim's separate backward branch) without block norms and with mean pooling
  over patches, trained on CIFAR-10 (the full train split from ../shared/data; evaluated on the CIFAR-10 test subset
  shipped with mambaquant).
- tagger: a per-token tagger over token ids: every token is labelled with the last "marker" token seen before
  it (4 markers among 20 fillers; class 4 before any marker), so the state has to hold it across the fillers.

Each fixture directory holds the model (config.json + model.safetensors, written by `mambaquant.save`),
fixture.json (task, data, training recipe and command, FP top-1 on the held-out split) and, for the generated tasks,
data.safetensors (calibration inputs from the training distribution's generator stream, evaluation inputs and
labels from a held-out stream of their own: disjoint by construction). Calibration is always training data, and
evaluation always held out.

    python benchmarks/train_generality.py [NAME ...] [--out tests/data/generality]

Deterministic with the seed in each recipe (CPU, one thread). `load_fixture(NAME)` reads one back:
(model, calibration inputs, (evaluation inputs, labels), fixture record).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "generality"
NAMES = ("timeseries", "single-token", "vision", "tagger")
CALIB_SAMPLES = 64

# Data generators: one torch.Generator per stream; training, calibration and evaluation streams differ by seed


def pulse_signals(n: int, seed: int, length: int = 187, classes: int = 5):
    """(n, length, 1) signals with k in 0..classes-1 Gaussian pulses (width ~2.5 steps, height 0.8..1.6, at least 8
    steps apart) over a slow baseline wander (a sinusoid of amplitude up to 0.4) and white noise (std 0.25); label
    k."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    t = torch.arange(length, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    freq = (0.5 + 1.5 * torch.rand(n, 1, generator=g)) * 2 * math.pi / length
    x = 0.4 * torch.rand(n, 1, generator=g) * torch.sin(freq * t + phase)
    x = x + 0.25 * torch.randn(n, length, generator=g)
    for i in range(n):
        centres: list[int] = []
        while len(centres) < labels[i]:
            c = int(torch.randint(6, length - 6, (1,), generator=g))
            if all(abs(c - other) >= 8 for other in centres):
                centres.append(c)
        for c in centres:
            height = 0.8 + 0.8 * float(torch.rand(1, generator=g))
            x[i] += height * torch.exp(-0.5 * ((t - c) / 2.5) ** 2)
    return x[..., None], labels


def teacher_vectors(n: int, seed: int, features: int = 32, classes: int = 6, teacher_seed: int = 1234):
    """(n, features) standard normal vectors labelled by the argmax of a fixed random teacher (features -> 64 ->
    tanh -> classes), the same teacher for every stream."""
    t = torch.Generator().manual_seed(teacher_seed)
    w1, w2 = torch.randn(features, 64, generator=t) / math.sqrt(features), torch.randn(64, classes, generator=t)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, (torch.tanh(x @ w1) @ w2).argmax(-1)


def marker_sequences(n: int, seed: int, length: int = 64, markers: int = 4, vocab: int = 24, p_marker: float = 0.06):
    """(n, length) token ids: markers 0..markers-1 with probability p_marker, fillers markers..vocab-1 otherwise;
    each token labelled with the last marker at or before it (class `markers` before the first)."""
    g = torch.Generator().manual_seed(seed)
    is_marker = torch.rand(n, length, generator=g) < p_marker
    tokens = torch.where(is_marker, torch.randint(0, markers, (n, length), generator=g),
                         torch.randint(markers, vocab, (n, length), generator=g))
    labels = torch.full((n, length), markers)
    current = torch.full((n,), markers)
    for i in range(length):
        current = torch.where(is_marker[:, i], tokens[:, i], current)
        labels[:, i] = current
    return tokens, labels


def cifar_split(split: str):
    from mambaquant.data import cifar10, normalise_images

    images, labels, description = cifar10(split)
    return normalise_images(images), torch.from_numpy(labels), description


def shipped_cifar(split: str):
    """The CIFAR-10 subset shipped with mambaquant (test: 2,000 images; train: 500), whatever ../shared holds."""
    from mambaquant.data import PACKAGE_DATA, normalise_images, read_cifar10_tar

    images, labels = read_cifar10_tar(PACKAGE_DATA / f"cifar10_{split}_subset.tar.gz", split)
    return normalise_images(images), torch.from_numpy(labels)


# Recipes: model config, data streams, optimiser

RECIPES = {
    "timeseries": {
        "config": {"stem": "linear", "in_features": 1, "seq_len": 187, "residual": False, "norm": "none",
                   "final_norm": "layer", "pooling": "mean", "head": "mlp", "head_hidden": 32, "head_act": "gelu",
                   "d_model": 32, "n_layer": 2, "d_state": 8, "num_classes": 5},
        "data": "pulse_signals", "train": 6000, "eval": 500, "steps": 1000, "batch": 64, "lr": 3e-3, "seed": 0,
        "task": "how many pulses (0-4) a 187-step one-channel signal holds, under noise and baseline wander",
    },
    "single-token": {
        "config": {"stem": "flatten", "in_features": 32, "pooling": "last", "d_model": 32, "n_layer": 2,
                   "d_state": 8, "num_classes": 6},
        "data": "teacher_vectors", "train": 20000, "eval": 1000, "steps": 1500, "batch": 128, "lr": 3e-3, "seed": 0,
        "task": "the class (of 6) a fixed random teacher network gives a 32-feature standard normal vector",
    },
    "vision": {
        "config": {"stem": "patch", "img_size": 32, "patch_size": 4, "stride": 4, "in_chans": 3, "pos_embed": True,
                   "norm": "none", "final_norm": "rms", "bidirectional": "separate", "pooling": "mean",
                   "d_model": 48, "n_layer": 2, "d_state": 8, "num_classes": 10},
        "data": "cifar10", "train": 50000, "eval": 500, "steps": 1200, "batch": 64, "lr": 3e-3, "seed": 0,
        "task": "CIFAR-10 classification (10 classes), trained on the full train split",
    },
    "tagger": {
        "config": {"stem": "embedding", "vocab_size": 24, "pooling": "none", "d_model": 32, "n_layer": 2,
                   "d_state": 8, "num_classes": 5},
        "data": "marker_sequences", "train": 8000, "eval": 300, "steps": 800, "batch": 64, "lr": 3e-3, "seed": 0,
        "task": "per token: the last of 4 marker tokens seen before it among 20 filler tokens (5 classes, 64 tokens)",
    },
}
GENERATORS = {"pulse_signals": pulse_signals, "teacher_vectors": teacher_vectors, "marker_sequences": marker_sequences}
# stream seeds: training, calibration (from the training distribution, its own stream), evaluation (held out)
STREAMS = {"train": 1, "calib": 2, "eval": 3}


def datasets(name: str, recipe: dict):
    """((train inputs, labels), calibration inputs, (eval inputs, labels), descriptions)."""
    if recipe["data"] == "cifar10":
        x_train, y_train, train_description = cifar_split("train")
        if len(y_train) < recipe["train"]:
            raise SystemExit("training the vision fixture needs the full CIFAR-10 train split: "
                             "../shared/data/cifar10/cifar10-jpeg.tar.gz (or MAMBAQUANT_DATA)")
        calib, _ = shipped_cifar("train")
        x_eval, y_eval = shipped_cifar("test")
        every = len(y_eval) // recipe["eval"]
        return (x_train, y_train), calib[:: len(calib) // CALIB_SAMPLES][:CALIB_SAMPLES], \
            (x_eval[::every][: recipe["eval"]], y_eval[::every][: recipe["eval"]]), {
                "train": train_description,
                "calib": f"{CALIB_SAMPLES} images, every {len(calib) // CALIB_SAMPLES}th of the CIFAR-10 train subset "
                         "shipped with mambaquant (mambaquant/data/cifar10_train_subset.tar.gz)",
                "eval": f"{recipe['eval']} images, every {every}th of the CIFAR-10 test subset shipped with mambaquant "
                        "(mambaquant/data/cifar10_test_subset.tar.gz, sorted by class: 50 per class)"}
    generate = GENERATORS[recipe["data"]]
    base = 1000 * recipe["seed"]
    train = generate(recipe["train"], base + STREAMS["train"])
    calib, _ = generate(CALIB_SAMPLES, base + STREAMS["calib"])
    held_out = generate(recipe["eval"], base + STREAMS["eval"])
    what = f"{recipe['data']} (benchmarks/train_generality.py)"
    return train, calib, held_out, {"train": f"{recipe['train']} samples of {what}, seed {base + STREAMS['train']}",
                                    "calib": f"{CALIB_SAMPLES} samples of {what}, seed {base + STREAMS['calib']}",
                                    "eval": f"{recipe['eval']} samples of {what}, seed {base + STREAMS['eval']}"}


def pytorch_default_init(model, seed: int) -> None:
    """The linear and conv layers as public PyTorch code initialises them (nn.Linear's default, as mamba_ssm's Mamba
    has for in_proj, x_proj and out_proj), dt_proj's Mamba initialisation kept: `mambaquant.build`'s std 0.02
    leaves a model without norms or residuals with a vanishing signal."""
    from torch import nn

    torch.manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not name.endswith("dt_proj"):
            module.reset_parameters()


def top1(model, inputs, labels, batch: int = 250) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            correct += (model(inputs[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum().item()
    return 100.0 * correct / labels.numel()


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel padding and horizontal flip (the zoo's vim-cifar10 recipe)."""
    n = len(images)
    padded = F.pad(images, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()
    out = padded[:, :, dy:dy + 32, dx:dx + 32]
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train(name: str, out: Path, log=print, steps: int | None = None) -> dict:
    import mambaquant

    recipe = dict(RECIPES[name], **({"steps": steps} if steps else {}))
    torch.manual_seed(recipe["seed"])
    (x_train, y_train), calib, (x_eval, y_eval), described = datasets(name, recipe)
    model = mambaquant.build(recipe["config"], seed=recipe["seed"])
    pytorch_default_init(model, recipe["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.01)
    g = torch.Generator().manual_seed(recipe["seed"] + 7)
    steps, started, curve = recipe["steps"], time.time(), []
    for step in range(steps):
        lr = recipe["lr"] * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(0, len(y_train), (recipe["batch"],), generator=g)
        x, y = x_train[index], y_train[index]
        if recipe["data"] == "cifar10":
            x = augment(x, g)
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            model.eval()
            accuracy = top1(model, x_eval, y_eval)
            curve.append({"step": step + 1, "loss": round(loss.item(), 4), "eval_top1": accuracy})
            log(f"{name} step {step + 1}/{steps} loss {loss.item():.4f} held-out top-1 {accuracy:.2f} % "
                f"({time.time() - started:.0f} s)")
    model.eval()
    directory = out / name
    mambaquant.save(model, directory / "model")
    record = {
        "name": name, "task": recipe["task"], "config": recipe["config"],
        "recipe": {k: v for k, v in recipe.items() if k not in ("config", "task")},
        "data": described, "classes": recipe["config"]["num_classes"],
        "chance_top1": round(100.0 * chance(y_eval, recipe["config"]["num_classes"]), 2),
        "fp_top1": top1(model, x_eval, y_eval), "eval_samples": len(y_eval), "calib_samples": len(calib),
        "curve": curve, "train_seconds": round(time.time() - started, 1),
        "command": f"python benchmarks/train_generality.py {name}",
        "torch": torch.__version__,
    }
    if recipe["data"] != "cifar10":
        from safetensors.torch import save_file

        small = (lambda t: t.to(torch.uint8)) if recipe["data"] == "marker_sequences" else (lambda t: t)
        save_file({"calib": small(calib).contiguous(), "eval_inputs": small(x_eval).contiguous(),
                   "eval_labels": y_eval.to(torch.uint8).contiguous()}, str(directory / "data.safetensors"))
    (directory / "fixture.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"{name}: held-out top-1 {record['fp_top1']:.2f} % (chance {record['chance_top1']:.2f} %), "
        f"{record['train_seconds']:.0f} s -> {directory}")
    return record


def chance(labels: torch.Tensor, classes: int) -> float:
    """The top-1 of always answering the most frequent class of the held-out labels."""
    return torch.bincount(labels.flatten(), minlength=classes).max().item() / labels.numel()


def load_fixture(name: str, root: Path = FIXTURES):
    """(model, calibration inputs, (evaluation inputs, labels), fixture record) of one shipped fixture."""
    import mambaquant

    directory = root / name
    record = json.loads((directory / "fixture.json").read_text())
    model = mambaquant.load(directory / "model").eval()
    if record["recipe"]["data"] == "cifar10":
        calib, _ = shipped_cifar("train")
        calib = calib[:: len(calib) // CALIB_SAMPLES][:CALIB_SAMPLES]
        x_eval, y_eval = shipped_cifar("test")
        every = len(y_eval) // record["eval_samples"]
        return model, calib, (x_eval[::every][: record["eval_samples"]], y_eval[::every][: record["eval_samples"]]), \
            record
    from safetensors.torch import load_file

    data = load_file(str(directory / "data.safetensors"))  # token ids and labels stored as uint8
    tokens = (lambda t: t.long()) if record["recipe"]["data"] == "marker_sequences" else (lambda t: t)
    return model, tokens(data["calib"]), (tokens(data["eval_inputs"]), data["eval_labels"].long()), record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(NAMES), help=f"fixtures to train (default: all of {NAMES})")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    parser.add_argument("--steps", type=int, help="override the recipes' steps (a quick look, not the fixtures')")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    for name in args.names:
        if name not in RECIPES:
            raise SystemExit(f"unknown fixture {name!r}; expected some of {', '.join(NAMES)}")
        train(name, args.out, log=lambda message: print(message, flush=True), steps=args.steps)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
