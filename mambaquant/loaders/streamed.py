"""A language-model checkpoint opened for reading one block at a time (safetensors, one file or Hugging Face
shards, in float32, float16 or bfloat16): its config and tensor names checked against the model it builds before
anything is read, the embedding, final norm and head read into a model whose blocks stay on the meta device, and
each block read when it is asked for. The streamed quantization that walks it is `methods.streamed`."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..runtime import HybridLMConfig, Mamba2LMConfig, MambaLM
from ..schema import display
from . import hf, hybrid, mamba2
from .hub import parse_hub_id, snapshot_directory
from .weights import (BLOCK_PREFIX, Checkpoint, assign_weights, check_weights, find_weight_file, on_meta_device,
                      open_checkpoint, rename, tied_names)


@dataclass
class StreamedCheckpoint:
    """A language-model checkpoint opened for block-by-block reading: its config and tensor infos, checked against
    the model it builds before anything is read."""

    config: object  # LMConfig, Mamba2LMConfig or HybridLMConfig
    checkpoint: Checkpoint
    weights: dict  # runtime name -> (checkpoint name, TensorInfo or a meta tensor: its shape)
    source: str  # for messages
    origin: Path  # the directory or file opened
    reader: hybrid.BlockReader | None = None  # a hybrid in its model's layout: tensors split, stacked, folded

    def block_names(self, index: int) -> dict[str, tuple[str, object]]:
        """Block `index`'s entries named within the block; a Zamba2 hybrid layer's shared block from the layer that
        holds it (its own adapters kept)."""
        own = within(self.weights, f"layers.{index}.")
        owner = dict(self.config.shared_owners()).get(index, index) if isinstance(self.config, HybridLMConfig) \
            else index
        return own if owner == index else {**within(self.weights, f"layers.{owner}.", "shared."), **own}

    def read_block(self, index: int) -> dict[str, tuple[str, torch.Tensor]]:
        """Block `index`'s tensors, named within the block."""
        return self.reader.block(index) if self.reader else self.read(self.block_names(index))

    def read_ends(self) -> dict[str, tuple[str, torch.Tensor]]:
        """The embedding, the final norm and the head."""
        if self.reader:
            return self.reader.ends()
        return self.read({name: entry for name, entry in self.weights.items() if not BLOCK_PREFIX.match(name)})

    def read(self, weights: dict[str, tuple[str, object]]) -> dict[str, tuple[str, torch.Tensor]]:
        data = self.checkpoint.read_names([original for original, _ in weights.values()])
        return {name: (original, data[original]) for name, (original, _) in weights.items()}

    def float32_bytes(self, weights: dict[str, tuple[str, object]]) -> int:
        return sum(4 * info.shape.numel() for _, info in weights.values())


def within(weights: dict, prefix: str, keep: str = "") -> dict:
    """The entries under `prefix` (and its part `keep`), named without the prefix."""
    return {name[len(prefix):]: entry for name, entry in weights.items() if name.startswith(prefix + keep)}


def open_streamed(source) -> StreamedCheckpoint:
    """A Mamba-1, FalconMamba or Mamba-2 language model directory (Hugging Face or state-spaces config.json), a
    hybrid's (its model's own layout, or ours), or a bare safetensors file, opened for streaming; one line for
    anything else."""
    path = Path(source)
    where = display(path)
    reader = None
    if path.is_dir():
        from . import HYBRID_ARCHITECTURE, read_config

        config_dict = read_config(path)
        config_where = display(path / "config.json")
        if config_dict.get("architecture") == HYBRID_ARCHITECTURE:
            config = HybridLMConfig.from_dict(config_dict, where=config_where)
        elif config_dict.get("architecture") is not None:
            raise InputError(f"{where}: streamed quantization reads full-precision language models (Hugging Face or "
                             f"state-spaces layout); this is a {display(config_dict['architecture'])} directory: "
                             "quantize it in memory (without --stream)")
        elif hybrid.is_hybrid_config(config_dict):
            config = hybrid.config_from_hf(config_dict, config_where)
        elif mamba2.is_hf_config(config_dict):
            config = mamba2.lm_config_from_hf(config_dict, config_where)
        elif mamba2.is_state_spaces_config(config_dict):
            config = mamba2.lm_config_from_state_spaces(config_dict, config_where)
        elif hf.is_hf_config(config_dict):
            config = hf.lm_config_from_hf(config_dict, config_where)
        elif hf.is_state_spaces_config(config_dict):
            config = hf.lm_config_from_state_spaces(config_dict, config_where)
        else:
            raise InputError(f"{where}: not a Mamba language model config (expected a Hugging Face Mamba, "
                             "FalconMamba or Mamba-2 config.json, or a state-spaces one)")
        weight_file = find_weight_file(path)
    elif path.is_file():
        weight_file, config = path, None
    else:
        raise InputError(f"{where}: no such file or directory (expected a model directory or a safetensors file)")
    if not weight_file.name.endswith((".safetensors", ".safetensors.index.json")):
        raise InputError(f"{display(weight_file)}: streamed quantization reads safetensors checkpoints, whose header "
                         "locates every block without reading the file; a torch pickle is read whole (convert it "
                         "with safetensors, or quantize in memory without --stream)")
    checkpoint = open_checkpoint(weight_file)
    if checkpoint.read_names is None:
        raise InputError(f"{display(weight_file)}: some shards are torch pickles, which are read whole; streamed "
                         "quantization reads safetensors shards")
    if config is None:
        config = (mamba2.lm_config_from_weights(checkpoint.infos, where) if mamba2.is_mamba2_state_dict(
            checkpoint.infos) else hf.lm_config_from_weights(checkpoint.infos, where)
            if hf.is_lm_state_dict(checkpoint.infos) else None)
        if config is None:
            raise InputError(f"{where}: not a Mamba language model state dict (expected backbone.* tensors)")
    if isinstance(config, HybridLMConfig) and config_dict.get("architecture") is None:
        reader = hybrid.BlockReader(config_dict, config, checkpoint, where)
        weights, names = reader.weights, None
    else:
        rules, names = ((mamba2.TO_RUNTIME, mamba2.TO_HF) if isinstance(config, Mamba2LMConfig) else
                        (hf.TO_RUNTIME, hf.TO_HF) if not isinstance(config, HybridLMConfig) else ([], None))
        weights = rename(checkpoint.infos, rules)
    with on_meta_device():
        model = MambaLM(config)
    check_weights(model.state_dict(), tied_names(model), weights, where, names)
    return StreamedCheckpoint(config, checkpoint, weights, where, path, reader)


def build_skeleton(streamed: StreamedCheckpoint) -> MambaLM:
    """The model with its blocks on the meta device (shapes only) and the rest read in float32."""
    with on_meta_device():
        model = MambaLM(streamed.config)
    layers, model.layers = model.layers, nn.ModuleList()  # the rest alone, for to_empty and the checks
    model.to_empty(device="cpu")
    if streamed.config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    assign_weights(model, streamed.read_ends(), streamed.source)
    model.layers = layers
    return model.eval()


def opened_for_streaming(source, strict: bool) -> StreamedCheckpoint | None:
    """`source` opened for a streamed walk (a `StreamedCheckpoint`) where it is a language-model checkpoint on disk
    that one can read; None otherwise, or with `strict` the one line saying why not."""
    if isinstance(source, str) and not os.path.exists(source) and parse_hub_id(source):
        source = snapshot_directory(source)  # its safetensors are read in place, in the cache
    if not isinstance(source, (str, os.PathLike)) or not os.path.exists(source):
        if strict:
            raise InputError(f"stream=True reads a checkpoint on disk (a model directory or a safetensors file); "
                             f"got {source if isinstance(source, str) else type(source).__name__}")
        return None
    try:
        return open_streamed(source)
    except InputError:
        if strict:
            raise
        return None
