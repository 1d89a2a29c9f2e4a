"""Re-create the embedded models: `python -m mambaquant.zoo.train NAME --out DIR [options]`.

mamba-shakespeare: byte-level Mamba LM (Hugging Face Mamba-1 architecture) on the first 90 % of Tiny Shakespeare.
vim-cifar10: Vision Mamba on the CIFAR-10 train split, light augmentation (random crop with 4-pixel padding, flip).
Writes DIR (config.json + model.safetensors), DIR/training.json (recipe, command, learning curve, wall time,
final metric) and DIR/MODEL_CARD.md.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import shared_data_dir
from ..errors import InputError
from ..evaluation.text import bits_per_byte
from ..loaders import save
from ..runtime import LMConfig, MambaLM, init_weights


@dataclass
class ShakespeareRecipe:
    d_model: int = 256
    n_layer: int = 4
    d_state: int = 16
    seq_len: int = 256
    batch_size: int = 32
    steps: int = 3000
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    seed: int = 0


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only (not on norms, biases, A_log, D, embeddings of size 1)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def tinyshakespeare_splits() -> tuple[bytes, bytes]:
    data = shared_data_dir()
    path = data / "tinyshakespeare" / "input.txt" if data else None
    if path is None or not path.is_file():
        raise InputError("training needs ../shared/data/tinyshakespeare/input.txt (or MAMBAQUANT_DATA pointing at it)")
    text = path.read_bytes()
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def train_shakespeare(recipe: ShakespeareRecipe, log) -> tuple[MambaLM, dict]:
    train_text, val_text = tinyshakespeare_splits()
    torch.manual_seed(recipe.seed)
    config = LMConfig(d_model=recipe.d_model, n_layer=recipe.n_layer, d_state=recipe.d_state, vocab_size=256)
    model = init_weights(MambaLM(config), seed=recipe.seed)
    optimizer = make_optimizer(model, recipe.lr, recipe.weight_decay)
    data = torch.frombuffer(bytearray(train_text), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(recipe.seed)
    curve = []
    start_time = time.time()
    for step in range(recipe.steps + 1):
        if step % recipe.eval_every == 0 or step == recipe.steps:
            model.eval()
            val_bpb, _ = bits_per_byte(model, val_text, max_windows=None if step == recipe.steps else 64)
            model.train()
            curve.append({"step": step, "val_bits_per_byte": round(val_bpb, 4), "seconds": round(time.time() - start_time)})
            log(f"step {step}: validation {val_bpb:.4f} bits/byte ({time.time() - start_time:.0f} s)")
        if step == recipe.steps:
            break
        offsets = torch.randint(0, len(data) - recipe.seq_len - 1, (recipe.batch_size,), generator=generator)
        batch = torch.stack([data[o : o + recipe.seq_len + 1] for o in offsets.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, recipe.steps, recipe.lr, recipe.warmup)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    final = curve[-1]["val_bits_per_byte"]
    metric = {"metric": "bits_per_byte", "value": final, "split": "Tiny Shakespeare last 10 % (111,540 bytes)"}
    return model, {"curve": curve, "final": metric, "wall_seconds": round(time.time() - start_time)}


RECIPES = {"mamba-shakespeare": (ShakespeareRecipe, train_shakespeare)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mambaquant.zoo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--overwrite", action="store_true")
    args, rest = parser.parse_known_args(argv)
    recipe_class, train = RECIPES[args.name]
    recipe_parser = argparse.ArgumentParser(prog=f"{parser.prog} {args.name}")
    for field in dataclasses.fields(recipe_class):
        recipe_parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    recipe = recipe_class(**vars(recipe_parser.parse_args(rest)))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} already exists; pass --overwrite")

    def log(message):
        print(message, flush=True)

    model, report = train(recipe, log)
    command = "python -m mambaquant.zoo.train " + " ".join(sys.argv[1:] if argv is None else argv)
    save(model, out, overwrite=args.overwrite)
    report = {"name": args.name, "recipe": dataclasses.asdict(recipe), "command": command,
              "torch": torch.__version__, "threads": torch.get_num_threads(), **report}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}: {report['final']}")


if __name__ == "__main__":
    main()
