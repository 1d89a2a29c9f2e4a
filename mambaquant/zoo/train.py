"""Re-create the embedded models: `python -m mambaquant.zoo.train NAME --out DIR [options]`.

mamba-shakespeare: byte-level Mamba LM (Hugging Face Mamba-1 architecture) on the first 90 % of Tiny Shakespeare.
mamba2-shakespeare: the same with Mamba-2 (SSD) blocks (Hugging Face Mamba2ForCausalLM layout).
hybrid-shakespeare: the same with a hybrid's blocks (Mamba-2, attention, MLP; our hybrid-lm layout).
vim-cifar10: Vision Mamba on the CIFAR-10 train split, light augmentation (random crop with 4-pixel padding, flip).
Writes DIR (config.json + model.safetensors), DIR/training.json (recipe, command, learning curve, wall time,
final metric) and DIR/MODEL_CARD.md.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import PACKAGE_DATA, cifar10, normalise_images, read_cifar10_tar, shared_data_dir
from ..errors import InputError
from ..evaluation.text import bits_per_byte
from ..loaders import save
from ..runtime import (AttentionConfig, HybridLMConfig, LMConfig, Mamba2Config, Mamba2LMConfig, MambaLM, MambaTagger,
                       MLPConfig, VisionConfig, VisionMamba, init_weights)


@dataclass
class ShakespeareRecipe:
    d_model: int = 192
    n_layer: int = 4
    d_state: int = 16
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    eval_every: int = 200
    seed: int = 0

    def model(self) -> MambaLM:
        config = LMConfig(d_model=self.d_model, n_layer=self.n_layer, d_state=self.d_state, vocab_size=256)
        return init_weights(MambaLM(config), seed=self.seed)


@dataclass
class Mamba2ShakespeareRecipe(ShakespeareRecipe):
    d_state: int = 64
    head_dim: int = 32
    n_groups: int = 1
    steps: int = 1500
    eval_every: int = 250

    def model(self) -> MambaLM:
        config = Mamba2LMConfig(d_model=self.d_model, n_layer=self.n_layer, d_state=self.d_state,
                                head_dim=self.head_dim, n_groups=self.n_groups, vocab_size=256)
        return init_weights(MambaLM(config), seed=self.seed)


@dataclass
class HybridShakespeareRecipe(ShakespeareRecipe):
    """A Nemotron-H / Granite-4.0-H-style hybrid: mostly Mamba-2 blocks, one attention block (grouped-query, no
    positional encoding: the Mamba blocks carry position) and squared-ReLU MLP blocks, about mamba2-shakespeare's
    size."""

    blocks: str = "mamba2,mlp,mamba2,attention,mlp,mamba2"
    d_state: int = 64
    head_dim: int = 32
    n_heads: int = 6
    n_kv_heads: int = 2
    d_ff: int = 384
    steps: int = 1500
    eval_every: int = 250

    def model(self) -> MambaLM:
        d = self.d_model
        config = HybridLMConfig(
            vocab_size=256, d_model=d, blocks=self.blocks.split(","),
            mamba2=Mamba2Config(d_model=d, d_state=self.d_state, head_dim=self.head_dim),
            attention=AttentionConfig(d_model=d, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, rope=False),
            mlp=MLPConfig(d_model=d, d_ff=self.d_ff, gated=False, activation="relu2"), tie_embeddings=True)
        return init_weights(MambaLM(config), seed=self.seed)


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
    model = recipe.model()
    optimizer = make_optimizer(model, recipe.lr, recipe.weight_decay)
    data = torch.frombuffer(bytearray(train_text), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(recipe.seed)
    curve = []
    start_time = time.time()
    for step in range(recipe.steps + 1):
        if step % recipe.eval_every == 0 or step == recipe.steps:
            model.eval()
            val_bpb, _ = bits_per_byte(model, val_text)
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
    data = "Tiny Shakespeare (karpathy/char-rnn), first 90 % (1,003,854 bytes) for training, random 256-byte windows"
    return model, {"data": data, "curve": curve, "final": metric, "wall_seconds": round(time.time() - start_time)}


@dataclass
class VimCifarRecipe:
    d_model: int = 128
    n_layer: int = 6
    d_state: int = 16
    patch_size: int = 4
    batch_size: int = 128
    epochs: int = 10
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    eval_images: int = 2000  # test images evaluated after each epoch (all 10,000 at the end)
    train_limit: int = 0  # train on the first N shuffled images only (0: all 50,000); for smoke runs
    seed: int = 0
    checkpoint: str = ""  # if set: the training state is saved here after each epoch and resumed from if present


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip, per image."""
    padded = F.pad(batch, (4, 4, 4, 4))
    offsets = torch.randint(0, 9, (len(batch), 2), generator=generator).tolist()
    flips = torch.rand(len(batch), generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy : dy + 32, dx : dx + 32] for i, (dy, dx) in enumerate(offsets)])
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return 100.0 * correct / len(labels)


def train_vim_cifar(recipe: VimCifarRecipe, log) -> tuple[VisionMamba, dict]:
    train_images, train_labels, train_source = cifar10("train")
    test_images, test_labels, test_source = cifar10("test")
    if len(train_labels) < 50000:
        raise InputError("training needs the full CIFAR-10 train split: ../shared/data/cifar10/cifar10-jpeg.tar.gz")
    if recipe.train_limit:
        keep = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(2))[: recipe.train_limit]
        train_images, train_labels = train_images[keep.numpy()], train_labels[keep.numpy()]
    x_train, y_train = normalise_images(train_images), torch.from_numpy(train_labels)
    x_test, y_test = normalise_images(test_images), torch.from_numpy(test_labels)
    probe = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(1))[: recipe.eval_images]
    torch.manual_seed(recipe.seed)
    config = VisionConfig(d_model=recipe.d_model, n_layer=recipe.n_layer, d_state=recipe.d_state, img_size=32,
                          patch_size=recipe.patch_size, stride=recipe.patch_size, num_classes=10)
    model = init_weights(VisionMamba(config), seed=recipe.seed)
    optimizer = make_optimizer(model, recipe.lr, recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = len(y_train) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    curve, step, first_epoch, start_time = [], 0, 1, time.time()
    if recipe.checkpoint and Path(recipe.checkpoint).exists():
        state = torch.load(recipe.checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        curve, step, first_epoch = state["curve"], state["step"], state["epoch"] + 1
        start_time -= curve[-1]["seconds"]
        log(f"resumed from {recipe.checkpoint} after epoch {state['epoch']}")
    for epoch in range(first_epoch, recipe.epochs + 1):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for index in order[: steps_per_epoch * recipe.batch_size].view(steps_per_epoch, recipe.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, recipe.lr, recipe.warmup)
            logits = model(augment(x_train[index], generator))
            loss = F.cross_entropy(logits, y_train[index], label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
        model.eval()
        accuracy = top1(model, x_test[probe], y_test[probe])
        curve.append({"epoch": epoch, "step": step, "train_loss": round(loss.item(), 4),
                      f"test_top1_{recipe.eval_images}": round(accuracy, 2), "seconds": round(time.time() - start_time)})
        log(f"epoch {epoch}: loss {loss.item():.3f}, top-1 {accuracy:.2f} % on {recipe.eval_images} test images "
            f"({time.time() - start_time:.0f} s)")
        if recipe.checkpoint:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "curve": curve, "step": step,
                     "epoch": epoch, "generator": generator.get_state()}
            torch.save(state, recipe.checkpoint + ".tmp")
            os.replace(recipe.checkpoint + ".tmp", recipe.checkpoint)
    accuracy = top1(model, x_test, y_test)
    log(f"final top-1 {accuracy:.2f} % ({test_source})")
    metric = {"metric": "top1", "value": round(accuracy, 2), "split": test_source}
    shipped_images, shipped_labels = read_cifar10_tar(PACKAGE_DATA / "cifar10_test_subset.tar.gz", "test")
    shipped = top1(model, normalise_images(shipped_images), torch.from_numpy(shipped_labels))
    metric["shipped_subset"] = {"value": round(shipped, 2), "split": "the 2,000 stratified test images shipped "
                                "with mambaquant (what a fresh clone evaluates)"}
    data = f"{train_source}; random crop (4-pixel padding) and horizontal flip; label smoothing"
    return model, {"data": data, "curve": curve, "final": metric, "wall_seconds": round(time.time() - start_time)}


@dataclass
class TypesegRecipe:
    npz: str = ""  # typeseg's mamba_al.npz; empty: the installed typeseg package's copy


def convert_typeseg(recipe: TypesegRecipe, log) -> tuple[MambaTagger, dict]:
    from ..evaluation.tagging import typeseg_accuracy
    from ..loaders import load
    from ..loaders.typeseg import packaged_npz

    model = load(Path(recipe.npz) if recipe.npz else packaged_npz())
    accuracy, _, _, protocol = typeseg_accuracy(model)
    log(f"byte accuracy {accuracy:.2f} % ({protocol})")
    metric = {"metric": "byte_accuracy", "value": round(accuracy, 2), "split": protocol}
    data = ("trained by Martin Dallinger on typeseg's own data (not distributed); weights from typeseg 0.2.7 "
            "(PyPI, Apache-2.0) data/mamba_al.npz, converted by mambaquant.loaders.typeseg")
    return model, {"data": data, "final": metric}


RECIPES = {
    "mamba-shakespeare": (ShakespeareRecipe, train_shakespeare),
    "mamba2-shakespeare": (Mamba2ShakespeareRecipe, train_shakespeare),
    "hybrid-shakespeare": (HybridShakespeareRecipe, train_shakespeare),
    "vim-cifar10": (VimCifarRecipe, train_vim_cifar),
    "typeseg": (TypesegRecipe, convert_typeseg),
}


def model_card(card: dict) -> str:
    lines = [f"# {card['name']}", "", card["architecture"], "", f"- parameters: {card['parameters']:,}",
             f"- data: {card['data']}", f"- recipe: `{json.dumps(card['recipe'])}`", f"- command: `{card['command']}`",
             f"- metric: {card['final']['metric']} = {card['final']['value']} ({card['final']['split']})"]
    if "shipped_subset" in card["final"]:
        subset = card["final"]["shipped_subset"]
        lines.append(f"- metric on {subset['split']}: {subset['value']}")
    lines += [f"- note: {note}" for note in card.get("notes", [])]
    if "wall_seconds" in card:
        lines.append(f"- wall time: {card['wall_seconds']} s on {card['threads']} CPU threads, torch {card['torch']}")
    if card.get("curve"):
        keys = list(card["curve"][0])
        lines += ["", "Learning curve:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(point[k]) for k in keys) + " |" for point in card["curve"]]
    return "\n".join(lines) + "\n"


def describe(model: torch.nn.Module) -> str:
    c = model.config
    kind = {"MambaLM": "causal LM", "VisionMamba": "Vision Mamba classifier", "MambaTagger": "per-token tagger"}
    extra = f", patch {c.patch_size}, {c.img_size}x{c.img_size} images" if isinstance(model, VisionMamba) else ""
    if isinstance(c, HybridLMConfig):
        m, a = c.mamba2, c.attention
        return (f"causal LM: {c.n_layer} blocks ({', '.join(c.blocks)}), d_model {c.d_model}; Mamba-2 {m.n_heads} "
                f"heads of {m.head_dim}, d_state {m.d_state}; attention {a.n_heads} heads, {a.n_kv_heads} KV heads, "
                f"no RoPE; MLP {c.mlp.d_ff} wide, {c.mlp.activation}")
    if isinstance(c, Mamba2LMConfig):
        return (f"{kind[type(model).__name__]}: {c.n_layer} Mamba-2 blocks, d_model {c.d_model}, d_inner {c.d_inner}, "
                f"{c.n_heads} heads of {c.head_dim}, d_state {c.d_state}, n_groups {c.n_groups}, conv {c.d_conv}")
    return (f"{kind[type(model).__name__]}: {c.n_layer} Mamba-1 blocks, d_model {c.d_model}, d_inner {c.d_inner}, "
            f"d_state {c.d_state}, dt_rank {c.dt_rank}, conv {c.d_conv} ({c.conv}), {c.norm} norm, "
            f"bidirectional {c.bidirectional}{extra}")


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
    # Subnormal floats flushed to zero, a guard against x86's slow subnormal arithmetic in decaying SSM states. Part
    # of the recorded recipe of mamba2-shakespeare; on that model it changed neither the step time (1.5 s) nor the
    # metric.
    torch.set_flush_denormal(True)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} already exists; pass --overwrite")

    def log(message):
        print(message, flush=True)

    model, report = train(recipe, log)
    command = "python -m mambaquant.zoo.train " + " ".join(sys.argv[1:] if argv is None else argv)
    save(model, out, overwrite=args.overwrite)
    card = {"name": args.name, "architecture": describe(model),
            "parameters": sum(p.numel() for p in model.parameters()), "recipe": dataclasses.asdict(recipe),
            "command": command, "torch": torch.__version__, "threads": torch.get_num_threads(), **report}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(card))
    log(f"wrote {out}: {card['final']}")


if __name__ == "__main__":
    main()
