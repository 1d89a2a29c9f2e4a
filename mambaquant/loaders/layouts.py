"""From-scratch Mamba layouts: the language models of alxndrTL's mamba.py and johnma2006's mamba-minimal
(`detect_layout`, `load_public_lm`), and `load_state_dict`, which loads a state dict of any layout into one of our
models: mamba_ssm's `Mamba` module names are found under any prefix, a `mapping` names the rest."""

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import InputError
from ..runtime import LMConfig, Mamba2Mixer, MambaBlock, MambaLM
from ..schema import boolean, display, integer, number, validate
from . import hf
from .weights import Checkpoint, any_named, assign_weights, check_before_loading, mamba_block_shapes, rename, require

# layout -> where its blocks are; both keep embedding.weight, norm_f.weight and lm_head.weight at the top, and name
# a block's RMSNorm `norm` and its mamba_ssm-named Mamba module `mixer`:
#   alxndrTL/mamba.py (mambapy/lm.py LM, head untied; mambapy/mamba_lm.py MambaLM, head tied): mamba.layers.N.
#   johnma2006/mamba-minimal (model.py Mamba, head tied): layers.N.
LAYOUTS = {"alxndrtl": "mamba.", "mamba-minimal": ""}
SSM = r"(conv1d\.\w+|x_proj\.weight|dt_proj\.\w+|A_log|D)"  # the parts of mamba_ssm's Mamba in our SelectiveSSM

# mamba.py's MambaConfig (its config dict); the fields that do not change the weights (dt init, pscan, ...) are ignored
ALXNDRTL_SCHEMA = {
    "d_model": integer(1, hf.SIZE),
    "n_layers": integer(1, hf.MAX_LAYERS),
    "dt_rank": integer(1, hf.SIZE, default="auto", special=("auto",)),
    "d_state": integer(1, 1024, default=16),
    "expand_factor": integer(1, 16, default=2),
    "d_conv": integer(1, 64, default=4),
    "rms_norm_eps": number(0, 1, default=1e-5, above=True),
    "bias": boolean(False),
    "conv_bias": boolean(True),
    "inner_layernorms": boolean(False),
    "mup": boolean(False),
}
MUP = ("muP models (mup true: norms without weights, logits divided by the width multiplier) are not supported; "
       "expected a mamba.py model trained without mup")


def detect_layout(names) -> str | None:
    """The layout of a Mamba-1 LM's tensor names: "alxndrtl" (mamba.py), "mamba-minimal", or None (neither)."""
    names = set(names)
    return next((layout for layout, prefix in LAYOUTS.items() if "embedding.weight" in names
                 and any_named(names, re.escape(prefix) + r"layers\.\d+\.mixer\.x_proj\.weight")), None)


def is_alxndrtl_config(config: dict) -> bool:
    return {"d_model", "n_layers"} <= config.keys()  # mamba_ssm's and mamba-minimal's configs say n_layer


def lm_config_from_alxndrtl(config: dict, vocab_size: int, tie_embeddings: bool, where: str) -> LMConfig:
    """mamba.py's MambaConfig dict -> LMConfig (the vocabulary, padded or not, is the embedding's)."""
    c = validate(config, ALXNDRTL_SCHEMA, where)
    if c["mup"]:
        raise InputError(f"{where}: {MUP}")
    if c["inner_layernorms"]:
        raise InputError(f"{where}: inner_layernorms (Jamba's norms of dt, B and C) are not supported; expected false")
    return LMConfig(d_model=c["d_model"], n_layer=c["n_layers"], d_state=c["d_state"], expand=c["expand_factor"],
                    d_conv=c["d_conv"], dt_rank=0 if c["dt_rank"] == "auto" else c["dt_rank"],
                    conv_bias=c["conv_bias"], bias=c["bias"], norm_eps=c["rms_norm_eps"], vocab_size=vocab_size,
                    tie_embeddings=tie_embeddings)


def load_public_lm(checkpoint: Checkpoint, source: str, config: dict | None = None) -> MambaLM:
    """A mamba.py or mamba-minimal LM checkpoint (see `detect_layout`) -> MambaLM. The configuration comes from the
    tensor shapes, or from mamba.py's config dict when given; a head absent or equal to the embedding is tied."""
    infos = checkpoint.infos
    layout = detect_layout(infos)
    if layout is None:
        raise InputError(f"{source}: not a mamba.py or mamba-minimal language model; expected embedding.weight and "
                         "blocks named (mamba.)layers.N.mixer.x_proj.weight")
    prefix = LAYOUTS[layout]
    if layout == "alxndrtl" and "norm_f.weight" not in infos:
        raise InputError(f"{source}: no norm_f.weight: {MUP}")
    vocab, d_model = require(infos, "embedding.weight", 2, source)
    tied = "lm_head.weight" not in infos
    if config is not None:
        lm_config = lm_config_from_alxndrtl(config, vocab, tied, f"{source} config")
    else:
        blocks = mamba_block_shapes(infos, re.escape(prefix) + r"layers\.(\d+)\.", prefix + "layers.0.", d_model,
                                    "the embedding's", source)
        lm_config = LMConfig.from_dict(dict(blocks, vocab_size=vocab, tie_embeddings=tied),
                                       where=f"{source} (the configuration its tensors imply)")
    p = re.escape(prefix)
    to_runtime = [(p + r"layers\.(\d+)\.mixer\." + SSM, r"layers.\1.mixer.ssm.\2"), (p + r"(layers\..*)", r"\1")]
    to_public = [(r"layers\.(\d+)\.mixer\.ssm\.(.*)", prefix + r"layers.\1.mixer.\2"),
                 (r"(layers\..*)", prefix + r"\1")]
    check_before_loading(lambda: MambaLM(lm_config), rename(infos, to_runtime), checkpoint.nbytes, source, to_public)
    tensors = checkpoint.read()
    head_and_embedding = {"lm_head.weight": tensors.get("lm_head.weight"),
                          "backbone.embedding.weight": tensors["embedding.weight"]}  # in hf's names
    lm_config = hf.tied_if_equal(lm_config, head_and_embedding)
    return assign_weights(MambaLM(lm_config), rename(tensors, to_runtime), source).eval()


# the tensors of mamba_ssm's Mamba (and of Vim's bidirectional one, `_b`) -> ours, under the block's `mixer`
MAMBA1 = [
    (r"(in|out)_proj\.(weight|bias)", r"\g<0>"),
    (r"(conv1d|x_proj|dt_proj)\.(weight|bias)|A_log|D", r"ssm.\g<0>"),
    (r"(conv1d|x_proj|dt_proj)_b\.(weight|bias)", r"ssm_b.\1.\2"),
    (r"A_b_log", "ssm_b.A_log"),
    (r"D_b", "ssm_b.D"),
]
MAMBA2 = [(r"(in_proj|out_proj|conv1d)\.(weight|bias)|dt_bias|A_log|D|norm\.weight", r"\g<0>")]  # ours: the same
# an A_log names where the Mamba modules are: PREFIX N.PATH A_log, N the last integer component of the name
ANCHOR = re.compile(r"(.*\.)?(\d+)\.((?:[A-Za-z_]\w*\.)*)A_(?:b_)?log")
SOURCE = "state dict"


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], mapping=None,
                    strict: bool = True) -> nn.Module:
    """Load `state_dict`, in any layout, into `model` (one of ours: MambaBlocks under `layers`); returns the model in
    eval mode. Each of its names is, in this order:
      - given our name by `mapping`: a dict {regex: our name} (the first regex, in order, that matches the whole of
        their name; the replacement may use its groups, `\\1` or `\\g<name>`), or a function their name -> our name or
        None (not mapped);
      - kept if it is one of our names;
      - else, if it follows mamba_ssm's `Mamba` (or `Mamba2`) module names under one consistent prefix
        (`PREFIX.N.PATH.in_proj.weight`, `.conv1d.*`, `.x_proj.*`, `.dt_proj.*`, `.A_log`, `.D`, `.out_proj.*` and
        Vim's `conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`; N the block), mapped to ours, and so is the
        block's norm `PREFIX.N.norm.*` beside the module (when PATH is not empty, as in mamba_ssm's Block).
    Every tensor must land on one of our parameters (with strict=False the others are ignored) and every parameter
    must be loaded (a tied one once), each with its shape; otherwise InputError, one line."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not layers or not all(isinstance(b, MambaBlock) for b in layers):
        raise InputError(f"load_state_dict: expected one of our models (MambaBlocks under .layers), got a "
                         f"{type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise InputError(f"{SOURCE}: expected a dict of named tensors, got a {type(state_dict).__name__}")
    bad = next((k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise InputError(f"{SOURCE}: entry {display(bad)} is a {type(state_dict[bad]).__name__}, expected a tensor")
    for name, tensor in state_dict.items():
        if tensor.is_meta or tensor.layout != torch.strided:
            what = "a meta tensor (a shape without data)" if tensor.is_meta else f"a {tensor.layout} tensor"
            raise InputError(f"{SOURCE}: {display(name)} is {what}; expected a dense tensor with its values")
    ours = model.state_dict()
    aliases = tied_aliases(model)
    custom = mapping_function(mapping)
    targets = {name: custom(name) or (name if name in ours else None) for name in state_dict}
    automatic = automatic_names([name for name, target in targets.items() if target is None],
                                isinstance(layers[0].mixer, Mamba2Mixer))
    weights, unmatched = {}, []
    for name, tensor in state_dict.items():
        target = targets[name] or automatic(name)
        target = aliases.get(target, target)
        if target not in ours:
            unmatched.append(name if target is None else f"{name} (as {target})")
        elif target in weights:
            first, kept = weights[target]
            tied = [alias for alias, owner in aliases.items() if owner == target]
            if not (tied and kept.shape == tensor.shape and torch.equal(kept, tensor)):
                detail = f" (tied to {', '.join(tied)} in this model, with other values)" if tied else ""
                raise InputError(f"{SOURCE}: {first} and {name} both load {target}{detail}; expected one tensor per "
                                 "parameter")
        else:
            weights[target] = (name, tensor)
    missing = [name for name in ours if name not in weights and name not in aliases]
    problems = [f"{len(unmatched)} tensor(s) match no parameter of the {type(model).__name__}: {listing(unmatched)}"
                ] if unmatched and strict else []
    problems += [f"{len(missing)} parameter(s) of the {type(model).__name__} are missing: {listing(missing)}"
                 ] if missing else []
    if problems:
        raise InputError(f"{SOURCE}: {'; '.join(problems)}; pass mapping={{their name regex: our name}} (or a "
                         "function) to name them")
    return assign_weights(model, weights, SOURCE).eval()


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{name: the name it shares its parameter with} for a model's tied parameters (MambaLM's head)."""
    owners, aliases = {}, {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owner = owners.setdefault(id(parameter), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def mapping_function(mapping) -> Callable[[str], str | None]:
    """`load_state_dict`'s mapping, checked, as a function their name -> our name or None."""
    if mapping is None:
        return lambda name: None
    if callable(mapping):
        def call(name):
            target = mapping(name)
            if target is not None and not isinstance(target, str):
                raise InputError(f"mapping({name!r}) returned a {type(target).__name__}; expected our name (a "
                                 "string) or None")
            return target
        return call
    if not isinstance(mapping, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in mapping.items()):
        raise InputError("mapping must be a dict {their name regex: our name} or a function their name -> our name "
                         f"or None, got a {type(mapping).__name__}")
    rules = []
    for pattern, replacement in mapping.items():
        try:
            rules.append((re.compile(pattern), replacement))
        except re.error as e:
            raise InputError(f"mapping: {pattern!r} is not a regular expression ({e})") from None

    def match(name):
        try:
            return first_match(rules, name)
        except (re.error, IndexError) as e:
            raise InputError(f"mapping: the replacement for {name!r} is invalid ({e})") from None
    return match


def first_match(rules, name: str) -> str | None:
    """The replacement of the first (pattern, replacement) rule whose pattern matches the whole name, else None."""
    for pattern, replacement in rules:
        found = re.fullmatch(pattern, name)
        if found:
            return found.expand(replacement)
    return None


def automatic_names(names: list[str], mamba2: bool) -> Callable[[str], str | None]:
    """Our names for those of `names` that follow mamba_ssm's module names (see `load_state_dict`), as a function;
    the modules must sit under one prefix and path."""
    anchors = sorted({(found[1] or "", found[3]) for found in map(ANCHOR.fullmatch, names) if found})
    if len(anchors) > 1:
        shown = ", ".join(f"{prefix}N.{path}" for prefix, path in anchors[:4])
        raise InputError(f"{SOURCE}: Mamba modules under {len(anchors)} different prefixes ({shown}); expected one, "
                         "or pass mapping= to name them")
    if not anchors:
        return lambda name: None
    (prefix, path), = anchors
    block = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    table = MAMBA2 if mamba2 else MAMBA1

    def automatic(name):
        found = block.fullmatch(name)
        if not found:
            return None
        layer, rest = int(found[1]), found[2]
        if path and rest in ("norm.weight", "norm.bias"):
            return f"layers.{layer}.{rest}"
        mixer = first_match(table, rest[len(path):]) if rest.startswith(path) else None
        return f"layers.{layer}.mixer.{mixer}" if mixer else None
    return automatic


def listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(map(display, names[:limit])) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")
