"""Safetensors written in shards as tensors come, in the Hugging Face layout: `model-0000k-of-0000n.safetensors`
and `model.safetensors.index.json` (its `weight_map` names each tensor's shard), or one `model.safetensors` when
everything fits one shard. A streamed walk hands over each block as it finishes it, so at most one shard's tensors
are held before they are written."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 2 * 2**30
INDEX = "model.safetensors.index.json"


class ShardWriter:
    """Collects tensors into `directory` (a staging directory: the names are final only at `close`)."""

    def __init__(self, directory: Path, shard_bytes: int = DEFAULT_SHARD_BYTES):
        if shard_bytes < 1:
            raise ValueError("a shard holds at least one byte")
        self.directory, self.shard_bytes = Path(directory), shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # each written shard's tensor names
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.shard_bytes:
                self.flush()
            self.pending[name] = tensor.detach().cpu().contiguous()
            self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, self.directory / f"shard-{len(self.shards) + 1}.partial")
        self.shards.append(list(self.pending))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left and give the shards their final names; returns the files written."""
        self.flush()
        count = len(self.shards)
        if count <= 1:
            if count:
                (self.directory / "shard-1.partial").rename(self.directory / "model.safetensors")
            else:
                save_file({}, self.directory / "model.safetensors")
            return ["model.safetensors"]
        weight_map, files = {}, []
        for number, names in enumerate(self.shards, 1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.directory / f"shard-{number}.partial").rename(self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
            files.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files + [INDEX]
