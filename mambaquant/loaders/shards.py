"""Safetensors written in shards as tensors come, in the Hugging Face layout: `model-0000k-of-0000n.safetensors`
and `model.safetensors.index.json` (its `weight_map` names each tensor's shard), or one `model.safetensors` when
everything fits one shard. Each tensor's bytes are written to disk as it comes (a streamed walk hands over each
block as it finishes it), so no shard is ever held in memory."""

import json
import shutil
import struct
from pathlib import Path

import torch

DEFAULT_SHARD_BYTES = 2 * 2**30
INDEX = "model.safetensors.index.json"
SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                     torch.bool: "BOOL"}


class ShardFile:
    """One safetensors file written as its tensors come: their bytes go straight to a data file beside it, and
    `close` writes the header (every tensor's dtype, shape and offsets) followed by those bytes. Nothing of a
    tensor is held once `add` returns."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self.data = open(self.data_path, "wb")
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        if size:
            self.data.write(tensor.reshape(-1).view(torch.uint8).numpy())
        self.entries[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.size, self.size + size]}
        self.size += size

    def close(self) -> None:
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self.data_path.unlink()


class ShardWriter:
    """Tensors written into `directory` (a staging directory: the names are final only at `close`) as they come,
    a new shard whenever the current one would pass `shard_bytes`."""

    def __init__(self, directory: Path, shard_bytes: int = DEFAULT_SHARD_BYTES):
        if shard_bytes < 1:
            raise ValueError("a shard holds at least one byte")
        self.directory, self.shard_bytes = Path(directory), shard_bytes
        self.shards: list[ShardFile] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if not self.shards or self.shards[-1].entries and self.shards[-1].size + size > self.shard_bytes:
                self.shards.append(ShardFile(self.directory / f"shard-{len(self.shards) + 1}.partial"))
            self.shards[-1].add(name, tensor)
            self.total_bytes += size

    def close(self) -> list[str]:
        """Finish the shards and give them their final names; returns the files written."""
        if not self.shards:
            self.shards.append(ShardFile(self.directory / "shard-1.partial"))
        for shard in self.shards:
            shard.close()
        count = len(self.shards)
        if count == 1:
            self.shards[0].path.rename(self.directory / "model.safetensors")
            return ["model.safetensors"]
        weight_map, files = {}, []
        for number, shard in enumerate(self.shards, 1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            shard.path.rename(self.directory / name)
            weight_map.update(dict.fromkeys(shard.entries, name))
            files.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files + [INDEX]
