"""`load(source)`: an embedded model name, a directory, a checkpoint file, a Hugging Face hub id or an in-memory
model -> our runtime."""

import json
import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..errors import InputError
from ..outputs import write_atomic_dir
from ..runtime import (HybridLMConfig, Mamba2LMConfig, MambaLM, MambaModel, MambaTagger, ModelConfig, TaggerConfig,
                      VisionConfig, VisionMamba)
from . import hf, hub, hybrid, layouts, mamba2, quantized, typeseg, vim
from .shards import DEFAULT_SHARD_BYTES, ShardWriter
from .layouts import load_state_dict  # noqa: F401 (mambaquant.load_state_dict)
from ..schema import describe, display, read_json
from ..zoo import MODELS_DIR, ZOO, ZOO_PREFIX, embedded_name
from .weights import find_weight_file, load_checked, open_checkpoint, tied_names
from .weights import read_tensors  # noqa: F401 (mambaquant.loaders.read_tensors)

HYBRID_CLASSES = ("GraniteMoeHybridForCausalLM", "BambaForCausalLM", "NemotronHForCausalLM", "JambaForCausalLM",
                  "FalconH1ForCausalLM", "Zamba2ForCausalLM")
SUPPORTED = (
    "Mamba-1 and Mamba-2 language models (Hugging Face MambaForCausalLM / FalconMambaForCausalLM / "
    "Mamba2ForCausalLM or the original "
    "state-spaces layout, alxndrTL mamba.py, johnma2006 mamba-minimal), "
    "hybrid language models (Hugging Face GraniteMoeHybrid (Granite-4.0-H), Bamba, NemotronH, Jamba, FalconH1, Zamba2), "
    "Vision Mamba (hustvl/Vim state dicts), typeseg's Mamba tagger (mamba_al.npz) and models composed from "
    "ModelConfig (saved by mambaquant)"
)
VISION_ARCHITECTURE = "vision-mamba"
TAGGER_ARCHITECTURE = "mamba-tagger"
MODEL_ARCHITECTURE = "mamba-model"
HYBRID_ARCHITECTURE = "hybrid-lm"
OUR_MODELS = (MambaLM, MambaModel, VisionMamba, MambaTagger)
# what `load` may be told about a bare checkpoint file whose state dict does not record it -> the files it applies to
LOAD_OPTIONS = {"img_size": "a Vision Mamba checkpoint file", "stride": "a Vision Mamba checkpoint file",
                "n_groups": "a Mamba-2 checkpoint file"}


def load(source, revision: str | None = None, **options) -> nn.Module:
    """Return a `MambaLM`, `MambaModel`, `VisionMamba` or `MambaTagger` in eval mode. `source`: an embedded model
    name (or `zoo:NAME`), a model directory, a checkpoint file, a Hugging Face hub id (`org/name`, `org/name@rev`;
    see `hub`) or a model object; `revision`, a branch, tag or commit of a hub id. `options` complete a bare
    checkpoint where its state dict does not record something: img_size and stride for Vim, n_groups for Mamba-2."""
    unknown = sorted(set(options) - set(LOAD_OPTIONS))
    if unknown:
        raise InputError(f"unknown option {', '.join(unknown)} to load; expected "
                         f"{', '.join(f'{name} ({kind})' for name, kind in LOAD_OPTIONS.items())}")
    if revision is not None:
        source = source_at_revision(source, revision)
    if isinstance(source, OUR_MODELS):
        check_no_options(options, f"a {type(source).__name__}")
        return source
    if isinstance(source, nn.Module):
        check_no_options(options, f"a {type(source).__name__}")
        if type(source).__name__ in ("MambaForCausalLM", "FalconMambaForCausalLM"):
            return hf.from_transformers(source)
        if type(source).__name__ == "Mamba2ForCausalLM":
            return mamba2.from_transformers(source)
        if type(source).__name__ in HYBRID_CLASSES:
            return hybrid.from_transformers(source)
        raise InputError(f"unsupported model object {type(source).__name__}; supported: {SUPPORTED}")
    kind, value = resolve_source(source)
    if kind == "zoo":
        check_no_options(options, f"embedded model {value}")
        return load_directory(MODELS_DIR / value)
    if value.is_dir():
        check_no_options(options, f"{display(value)}, a model directory")
        return load_directory(value)
    return load_checkpoint_file(value, options)


def check_no_options(options: dict, what: str) -> None:
    if options:
        raise InputError(f"{', '.join(options)}: options complete a bare checkpoint file, and {what} records its "
                         "config; expected no options")


def resolve_source(source) -> tuple[str, object]:
    """("zoo", NAME) for an embedded model, ("path", Path) for a file or directory, and for a Hugging Face hub id
    that is no existing path its snapshot directory (fetched if not cached); one line for anything else.
    A string that names both an embedded model and an existing path is refused: `./NAME` is the path,
    `zoo:NAME` the embedded model. A `Path` is always a path."""
    expected = f"an embedded model name ({', '.join(ZOO)}), a model directory, a checkpoint file or {hub.EXPECTED}"
    if isinstance(source, os.PathLike):
        path = Path(source)
        if not path_exists(path):
            raise InputError(f"{display(path)}: no such file or directory (expected a model directory or a "
                             "checkpoint file)")
        return "path", path
    if not isinstance(source, str):
        raise InputError(f"expected a model source: {expected} or a model object; got a {type(source).__name__}")
    if not source.strip():
        raise InputError(f"empty model source; expected {expected}")
    if source.startswith(ZOO_PREFIX):
        name = source[len(ZOO_PREFIX):]
        if name not in ZOO:
            raise InputError(f"{display(source)}: no embedded model {display(name)}; expected one of "
                             f"{', '.join(ZOO_PREFIX + n for n in ZOO)}")
        return "zoo", name
    exists = path_exists(Path(source))
    if source in ZOO:
        if exists:
            raise InputError(f"{source}: both an embedded model and a path here; write ./{source} for the path or "
                             f"{ZOO_PREFIX}{source} for the embedded model")
        return "zoo", source
    if exists:
        return "path", Path(source)
    if hub.parse_hub_id(source) is not None:
        return "path", hub.snapshot_directory(source)
    raise InputError(f"{display(source)}: no such file or directory, and not an embedded model (expected one of "
                     f"{', '.join(ZOO)}, a model directory, a checkpoint file or {hub.EXPECTED})")


def source_at_revision(source, revision: str) -> str:
    """A hub id and a revision (`--revision`, `revision=`) as `org/name@revision`, the form every command takes;
    refused for a source that is no hub id."""
    if isinstance(source, str) and not path_exists(Path(source)) and not embedded_name(source):
        return hub.pinned(source, revision)
    if isinstance(source, (str, os.PathLike)):
        what = "an embedded model" if embedded_name(source) and not path_exists(Path(source)) else "a local path"
    else:
        what = f"a {type(source).__name__}"
    raise InputError(f"{display(source)}: is {what}; a revision ({display(revision)}) applies to {hub.EXPECTED}")


def path_exists(path: Path) -> bool:
    try:
        os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return False
    return True


def check_source(name) -> None:
    """Raise the one-line error for a source that is not an embedded model (NAME or zoo:NAME) nor an existing
    path, or that is ambiguous between the two."""
    resolve_source(name)


def read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InputError(
            f"{display(directory)}: no config.json; expected a model directory (config.json + model.safetensors) "
            "or a checkpoint file"
        )
    config = read_json(config_path, "a JSON object describing the model")
    if not isinstance(config, dict):
        raise InputError(f"{display(config_path)}: expected a JSON object, got {describe(config)}")
    return config


def architecture_of(config: dict) -> str:
    """What a config says it is, for the unsupported-architecture message."""
    for key in ("architectures", "model_type", "architecture"):
        value = config.get(key)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return display(", ".join(value))
        if isinstance(value, str) and value:
            return display(value)
    return "unknown"


def load_directory(directory: Path) -> nn.Module:
    config = read_config(directory)
    source, where = display(directory), display(directory / "config.json")
    architecture = config.get("architecture")
    if architecture == VISION_ARCHITECTURE:
        vision_config = VisionConfig.from_dict(config, where=where)
        return vim.load_vim(vision_config, open_checkpoint(find_weight_file(directory)), source)
    if architecture in (TAGGER_ARCHITECTURE, MODEL_ARCHITECTURE):
        model_class, config_class = ((MambaTagger, TaggerConfig) if architecture == TAGGER_ARCHITECTURE else
                                     (MambaModel, ModelConfig))
        model_config = config_class.from_dict(config, where=where)
        return load_checked(lambda: model_class(model_config), open_checkpoint(find_weight_file(directory)), [],
                            source)
    if architecture == HYBRID_ARCHITECTURE:
        hybrid_config = HybridLMConfig.from_dict(config, where=where)
        return load_checked(lambda: MambaLM(hybrid_config), open_checkpoint(find_weight_file(directory)), [], source)
    if quantized.is_quantized_config(config):
        return quantized.build_quantized(config, open_checkpoint(find_weight_file(directory)), source)
    if architecture is None and hybrid.is_hybrid_config(config):
        return hybrid.load_hybrid(config, open_checkpoint(find_weight_file(directory)), source, where)
    if architecture is None and mamba2.is_hf_config(config):
        return mamba2.load_lm(mamba2.lm_config_from_hf(config, where), open_checkpoint(find_weight_file(directory)),
                              source)
    if architecture is None and mamba2.is_state_spaces_config(config):
        return mamba2.load_lm(mamba2.lm_config_from_state_spaces(config, where),
                              open_checkpoint(find_weight_file(directory)), source)
    if architecture is None and layouts.is_alxndrtl_config(config):
        return layouts.load_public_lm(open_checkpoint(find_weight_file(directory)), source, config)
    if architecture is None and hf.is_hf_config(config):
        lm_config = hf.lm_config_from_hf(config, where)
    elif architecture is None and hf.is_state_spaces_config(config):
        lm_config = hf.lm_config_from_state_spaces(config, where)
    else:
        raise InputError(f"{source}: unsupported architecture {architecture_of(config)}; supported: {SUPPORTED}")
    return hf.load_lm(lm_config, open_checkpoint(find_weight_file(directory)), source)


def load_checkpoint_file(path: Path, options: dict) -> nn.Module:
    source = display(path)
    if path.suffix == ".npz":
        checkpoint = typeseg.open_npz(path)
        if typeseg.is_typeseg_npz(checkpoint.infos):
            return typeseg.load_typeseg(checkpoint, source)
        raise InputError(f"{source}: unrecognised npz checkpoint; supported: {SUPPORTED}")
    if path.name.endswith(".json") and not path.name.endswith(".index.json"):
        raise InputError(f"{source}: a JSON file is not a checkpoint; expected a model directory, a checkpoint file "
                         "or a sharded index (*.index.json)")
    checkpoint = open_checkpoint(path)
    kind = (LOAD_OPTIONS["img_size"] if vim.is_vim_state_dict(checkpoint.infos) else
            LOAD_OPTIONS["n_groups"] if mamba2.is_mamba2_state_dict(checkpoint.infos) else None)
    misplaced = [name for name in options if LOAD_OPTIONS[name] != kind]
    if misplaced:
        raise InputError(f"{source}: {', '.join(misplaced)} apply only to {LOAD_OPTIONS[misplaced[0]]}, and this is "
                         f"{kind or 'not one'}; expected no such option")
    if kind == LOAD_OPTIONS["img_size"]:
        config = vim.vision_config_from_weights(checkpoint.infos, options, source)
        return vim.load_vim(config, checkpoint, source)
    if kind == LOAD_OPTIONS["n_groups"]:
        return mamba2.load_lm_file(checkpoint, source, options)
    if hf.is_lm_state_dict(checkpoint.infos):
        return hf.load_lm_file(checkpoint, source)
    if layouts.detect_layout(checkpoint.infos):
        return layouts.load_public_lm(checkpoint, source)
    raise InputError(f"{source}: unrecognised checkpoint; supported: {SUPPORTED}")


def check_saveable(model: nn.Module) -> None:
    """Refuse, with one line, a model that `load` could not rebuild from its config: another class than ours, or
    modules changed after it was built (a user subclass or a replaced part: compose it from ModelConfig fields
    instead, see docs/own-models.md)."""
    if type(model) not in OUR_MODELS:
        raise InputError(f"cannot save a {type(model).__name__}: mambaquant rebuilds a saved model from its config, "
                         f"so it saves {', '.join(c.__name__ for c in OUR_MODELS)} (not subclasses); compose a variant "
                         "from ModelConfig fields (docs/own-models.md)")
    for name, module in model.named_modules():
        if not type(module).__module__.startswith(("mambaquant.", "torch.nn.")):
            raise InputError(f"cannot save this {type(model).__name__}: its module {name} is a "
                             f"{type(module).__name__}, which mambaquant cannot rebuild on load; compose the model "
                             "from ModelConfig fields (docs/own-models.md)")
    if not hasattr(model, "quantization_report"):
        from .weights import on_meta_device

        with on_meta_device():
            expected = {k: tuple(v.shape) for k, v in type(model)(model.config).state_dict().items()}
        found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if expected != found:
            changed = sorted(set(expected.items()) ^ set(found.items()))[0][0]
            raise InputError(f"cannot save this {type(model).__name__}: its parameters differ from what its config "
                             f"builds (first at {changed}), so load could not rebuild it; change the config, not the "
                             "modules")


def save(model: nn.Module, directory: str | Path, overwrite: bool = False, notes: tuple[str, ...] = (),
         shard_size: int = DEFAULT_SHARD_BYTES, extra: Callable[[Path], None] | None = None) -> Path:
    """Write a model as config.json + model.safetensors (+ MODEL_CARD.md with `notes` for a quantized model); a
    model above `shard_size` bytes as Hugging Face shards (model-0000k-of-0000n.safetensors + an index).
    Full precision: the Hugging Face Mamba layout for language models (transformers can read it), the official
    Vim names for vision models, our own names and the config for a `MambaModel` or a hybrid language model (its
    weights shared across depths stored once). Quantized
    (`mambaquant.quantize`'s output): integer codes and everything
    that rebuilds the quantized model (see `loaders.quantized`). Atomic: written to a temporary directory that is
    renamed into place at the end, so an interrupted save leaves nothing that looks complete. `extra` writes more
    files into the directory before it is moved into place (an export beside the checkpoint)."""
    check_saveable(model)
    check_shard_size(shard_size)

    def write(staging: Path) -> None:
        shards = ShardWriter(staging, shard_size)
        card = None
        if hasattr(model, "quantization_report"):
            parts = quantized.QuantizedParts(shards.add)
            parts.add(model)
            config = quantized.quantized_config(model, parts.layout())
            card = quantized.model_card(config, notes)
        elif isinstance(model, MambaLM) and isinstance(model.config, HybridLMConfig):
            config = {"architecture": HYBRID_ARCHITECTURE, **model.config.to_dict()}
            shared = tied_names(model)  # tied heads, and Zamba2's weights shared across depths: stored once
            shards.add({name: tensor for name, tensor in model.state_dict().items() if name not in shared})
        elif isinstance(model, MambaLM) and isinstance(model.config, Mamba2LMConfig):
            config = mamba2.saved_config(model.config)
            shards.add(mamba2.saved_state_dict(model))
        elif isinstance(model, MambaLM):
            config = hf.hf_config(model.config)
            shards.add(hf.hf_state_dict(model))
        elif isinstance(model, VisionMamba) and vim.has_vim_layout(model.config):
            config = {"architecture": VISION_ARCHITECTURE, **model.config.to_dict()}
            shards.add(vim.vim_state_dict(model))
        else:
            architecture = TAGGER_ARCHITECTURE if isinstance(model, MambaTagger) else MODEL_ARCHITECTURE
            config = {"architecture": architecture, **model.config.to_dict()}
            shards.add(dict(model.state_dict()))  # a VisionMamba beyond Vim's layout too
        shards.close()
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if card:
            (staging / "MODEL_CARD.md").write_text(card)
        if extra is not None:
            extra(staging)

    return write_atomic_dir(directory, write, overwrite=overwrite)


def check_shard_size(shard_size) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 2**20:
        raise InputError(f"shard_size must be a whole number of bytes, at least 1 MiB (2**20); got {shard_size!r}")
