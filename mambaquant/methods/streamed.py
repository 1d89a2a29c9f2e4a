"""Streamed quantization of a language model larger than memory: the checkpoint (`loaders.streamed`) is read one
block at a time, each block quantized in float32 and written out as soon as it is finished, so that memory holds
the embedding, the final norm and the head, one block and the calibration activations, never the model.

The walk is the in-memory one (`walk.run_recipe`) over `StreamedBlocks`: a model-wide transform's per-block part
(norm fusion, the residual rotation) is recorded and applied to each block as it is read; a model-wide statistics
pass (MambaQuant's pooled residual covariance) reads every block once in full precision before the quantizing pass
reads them again. The result is the in-memory path's, bit for bit (tests/test_streamed.py).
"""

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..allocator import release_free_memory
from ..calibration import resolve_calibration
from ..errors import InputError
from ..loaders import check_shard_size, quantized
from ..loaders.shards import DEFAULT_SHARD_BYTES, ShardWriter
from ..loaders.streamed import StreamedCheckpoint, build_skeleton
from ..loaders.weights import BLOCK_PREFIX, assign_weights
from ..memory import check_allocation, describe
from ..outputs import check_free_space, write_atomic_dir
from ..runtime import MambaLM
from ..runtime.moe import expert_list_weights
from .walk import check_blocks_for, run_recipe

QUANTIZED_WEIGHT = re.compile(r"(layers\.\d+\.mixer\.(ssm(_b)?\.)?(in_proj|x_proj|dt_proj|out_proj)|lm_head)\.weight")
BLOCK_COPIES = 4  # a block in float32, its quantized form, GPTQ's Hessians and the block's temporaries


class StreamedBlocks:
    """The blocks of a streamed model (see `methods.stages.InMemoryBlocks` for the four methods): `load` reads a
    block in float32 and applies the edits recorded so far, `release` frees it, `finish` hands it to `on_finish`
    (the writer) and frees it."""

    def __init__(self, model: MambaLM, streamed: StreamedCheckpoint, on_finish: Callable[[int, nn.Module], None]):
        self.model, self.streamed, self.on_finish = model, streamed, on_finish
        self.edits: list[Callable[[nn.Module], None]] = []

    def __len__(self) -> int:
        return len(self.model.layers)

    def edit(self, block_edit: Callable[[nn.Module], None]) -> None:
        self.edits.append(block_edit)

    def load(self, index: int) -> nn.Module:
        layer = self.model.layers[index]
        layer.to_empty(device="cpu")
        assign_weights(layer, expert_list_weights(layer, self.streamed.read_block(index)),
                       f"{self.streamed.source} (block {index})")
        for block_edit in self.edits:
            block_edit(layer)
        return layer.eval()

    def release(self, index: int) -> None:
        self.model.layers[index].to("meta")
        release_free_memory()

    def finish(self, index: int) -> None:
        self.on_finish(index, self.model.layers[index])
        self.release(index)


def expected_output_bytes(streamed: StreamedCheckpoint, w_bits: int) -> int:
    """About what the quantized checkpoint takes on disk: the quantized linears' codes and row scales, everything
    else in float32 (a tied embedding is stored once, as the head's codes)."""
    total = 0
    for name, (_, info) in streamed.weights.items():
        count = info.shape.numel()
        if QUANTIZED_WEIGHT.fullmatch(name) and w_bits <= 8:
            total += count * w_bits // 8 + info.shape[0] * 4
        else:
            total += count * 4
    return total


def check_resources(streamed: StreamedCheckpoint, out: Path, w_bits: int, calibration_bytes: int) -> tuple[int, int]:
    """Refuse, before any work, a run whose output would not fit on disk or whose working set would not fit in
    memory; returns both estimates (bytes)."""
    disk = expected_output_bytes(streamed, w_bits)
    check_free_space(out, int(disk * 1.05) + 2**24)
    ends = {name: entry for name, entry in streamed.weights.items() if not BLOCK_PREFIX.match(name)}
    block = max(streamed.float32_bytes(streamed.block_names(i)) for i in range(streamed.config.n_layer))
    memory = streamed.float32_bytes(ends) + BLOCK_COPIES * block + calibration_bytes
    check_allocation(memory, f"streamed quantization of {streamed.source}")
    return disk, memory


def quantize_streamed(streamed: StreamedCheckpoint, out, config, calib=None, calib_samples: int = 32,
                      calib_len: int | None = None,
                      tokenizer: str | None = None, progress: bool = False, overwrite: bool = False,
                      shard_size: int = DEFAULT_SHARD_BYTES, notes: tuple[str, ...] = ()) -> Path:
    """Quantize the checkpoint `streamed` (`open_streamed`) with `config` (a `QuantConfig`) block by block into the
    directory `out` (written atomically, sharded at `shard_size` bytes); returns `out`."""
    check_shard_size(shard_size)
    if config.method == "fp":
        raise InputError("method fp quantizes nothing; expected a quantization method for a streamed run")
    if config.decide:
        raise InputError("decide runs the recipe several times on the model in memory; a streamed run reads each "
                         "block once: expected stream=False, or decide off")
    model = build_skeleton(streamed)
    check_blocks_for(config.method, model)
    batches = resolve_calibration(model, str(streamed.origin), calib, calib_samples, calib_len, config.seed,
                                  tokenizer=tokenizer)
    tokens = sum(batch.numel() for batch in batches)
    # a block's inputs and outputs as held (and the embedding outputs, for Zamba2's hybrid layers), and the float32
    # pass in between
    copies = 3 if any(layer.reads_embedding for layer in model.layers) else 2
    held = tokens * streamed.config.d_model * (copies * (2 if config.calib_dtype == "bfloat16" else 4) + 4)
    disk, memory = check_resources(streamed, Path(out), config.w_bits, held)
    if progress:
        print(f"streaming {streamed.config.n_layer} blocks of {streamed.source}: calibration "
              f"{sum(len(batch) for batch in batches)} x {batches[0].shape[-1]} = {tokens:,} tokens "
              f"({describe(held)} of activations per block); about {describe(memory)} of memory and "
              f"{describe(disk)} on disk", file=sys.stderr, flush=True)

    def write(staging: Path) -> None:
        shards = ShardWriter(staging, shard_size)
        parts = quantized.QuantizedParts(shards.add)
        blocks = StreamedBlocks(model, streamed, lambda index, layer: parts.add(layer, f"layers.{index}."))
        quantized_model, report = run_recipe(model, config, batches, progress, blocks=blocks, copy_model=False)
        quantized_model.quantization_report = report
        parts.add(quantized_model, skip="layers.")
        shards.close()
        checkpoint_config = quantized.quantized_config(quantized_model, parts.layout())
        (staging / "config.json").write_text(json.dumps(checkpoint_config, indent=2) + "\n")
        (staging / "MODEL_CARD.md").write_text(quantized.model_card(checkpoint_config, notes))

    return write_atomic_dir(out, write, overwrite=overwrite, sources=[streamed.origin])
