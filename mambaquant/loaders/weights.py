"""Reading tensors from checkpoint files and assigning them to a model, with one clear error for every mismatch.

Sizes are checked before anything is allocated: a checkpoint is first opened for its tensor names, shapes and dtypes
only (the safetensors header, a memory-mapped torch state dict, the npy headers of an npz); the model is built on
torch's meta device to know the shapes it expects and how much memory it needs; only when both agree, and the
memory is there, is the data read and the model built for real (`check_before_loading`, then `assign_weights`)."""

import contextlib
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import InputError
from ..memory import check_allocation
from ..schema import describe, display, read_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
BLOCK_PREFIX = re.compile(r"layers\.\d+\.")  # a block's tensors, by runtime name
SHARD_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # converted to float32 on loading
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class TensorInfo:
    """A stored tensor's shape and dtype, read from a file header without its data. `.T` and `.permute` give the
    info of the transformed tensor, so a name mapping can be applied to infos and tensors alike."""

    def __init__(self, shape, dtype):
        self.shape = torch.Size(shape)
        self.dtype = dtype  # a torch.dtype, or the file's own name for a dtype torch does not have

    @property
    def T(self) -> "TensorInfo":  # noqa: N802 (torch's name)
        return TensorInfo(self.shape[::-1], self.dtype)

    def permute(self, *dims: int) -> "TensorInfo":
        return TensorInfo([self.shape[d] for d in dims], self.dtype)

    def dim(self) -> int:
        return len(self.shape)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nbytes(tensor) -> int:
    """Bytes of a tensor or a TensorInfo (of its data as stored)."""
    itemsize = tensor.dtype.itemsize if isinstance(tensor.dtype, torch.dtype) else 8
    return math.prod(tensor.shape) * itemsize


@dataclass
class Checkpoint:
    """An opened checkpoint: its tensors' names, shapes and dtypes (`infos`), and `read` for the data;
    `read_names` reads some tensors only, each file opened for the call alone (safetensors files, which locate
    every tensor from their header; None for a torch pickle)."""

    path: Path
    infos: dict  # name -> TensorInfo, or a memory-mapped tensor
    read: Callable[[], dict[str, torch.Tensor]]
    read_names: Callable[[list[str]], dict[str, torch.Tensor]] | None = None

    @property
    def nbytes(self) -> int:
        return sum(nbytes(info) for info in self.infos.values())


def open_checkpoint(path: Path) -> Checkpoint:
    """A .safetensors, .bin/.pt/.pth file or a sharded index.json, opened for its tensor infos; nothing is read that
    the header does not describe. Nested `model`/`state_dict` entries (as in Vim's released checkpoints) are
    unwrapped."""
    if path.name.endswith(".index.json"):
        return open_index(path)
    if not path.is_file():
        raise InputError(f"{display(path)}: weight file not found")
    if path.suffix == ".safetensors":
        return open_safetensors(path)
    return open_torch(path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file (see `open_checkpoint`) -> {name: tensor}."""
    return open_checkpoint(path).read()


def open_safetensors(path: Path, names: list[str] | None = None) -> Checkpoint:
    where = display(path)

    def unreadable(e: Exception) -> InputError:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return InputError(f"{where}: unreadable safetensors file ({reason}); expected a complete safetensors file")

    try:
        with safe_open(path, "pt") as f:
            infos = {}
            for name in f.keys():
                part = f.get_slice(name)
                dtype = part.get_dtype()
                infos[name] = TensorInfo(part.get_shape(), SAFETENSORS_DTYPES.get(dtype, dtype))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise unreadable(e) from None

    def read_names(wanted) -> dict[str, torch.Tensor]:
        try:
            with safe_open(path, "pt") as f:  # the file's mapping lasts this call only: read pages leave the RSS
                return {name: f.get_tensor(name) for name in wanted}
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise unreadable(e) from None

    return Checkpoint(path, infos, lambda: read_names(list(infos if names is None else names)), read_names)


def open_torch(path: Path) -> Checkpoint:
    """A torch.save'd state dict, loaded with weights_only (no code runs) and memory-mapped where the format
    allows, so its tensors cost no memory until they are read."""
    where = display(path)
    with warnings.catch_warnings():  # torch warns about foreign pickles on stderr: the error line says it all
        warnings.simplefilter("ignore")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # an old non-zip format cannot be mapped; a corrupt or foreign file raises many types
            size = path.stat().st_size
            check_allocation(size, f"{where}: reading this checkpoint ({size / 1024**2:.0f} MiB, not memory-mappable)")
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise InputError(f"{where}: unreadable checkpoint ({type(e).__name__}); expected a torch state "
                                 "dict") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise InputError(f"{where}: expected a non-empty state dict of named tensors (optionally under the key "
                         "'model')")
    return Checkpoint(path, checkpoint, lambda: checkpoint)


def check_shard_name(index: Path, shard, tensor: str) -> Path:
    """A shard named by an index -> its path, which must be a checkpoint file inside the index's directory."""
    where = display(index)
    if not isinstance(shard, str) or not shard:
        raise InputError(f"{where}: weight_map[{tensor!r}] must be a shard file name (a non-empty string), "
                         f"got {describe(shard)}")
    shown = display(shard)
    if PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).is_absolute() or PureWindowsPath(shard).drive:
        raise InputError(f"{where}: shard {shown} is an absolute path; shards are read only from inside the model "
                         "directory (expected a file name relative to it)")
    if ".." in re.split(r"[/\\]", shard):
        raise InputError(f"{where}: shard {shown} goes up a directory ('..'); shards are read only from inside the "
                         "model directory")
    if shard.endswith(".index.json"):
        raise InputError(f"{where}: shard {shown} is an index, not a weight file; expected "
                         f"{' or '.join(SHARD_SUFFIXES)} files")
    if not shard.endswith(SHARD_SUFFIXES):
        raise InputError(f"{where}: shard {shown} is not a weight file; expected {' or '.join(SHARD_SUFFIXES)} files")
    directory = index.parent.resolve()
    try:
        path = (index.parent / shard).resolve()
    except (OSError, RuntimeError, ValueError):
        raise InputError(f"{where}: shard {shown} cannot be resolved (a symlink loop?)") from None
    blobs = snapshot_blobs(directory)  # a hub cache snapshot's files link into its repository's blobs/
    if not path.is_relative_to(directory) and not (blobs and path.is_relative_to(blobs)):
        raise InputError(f"{where}: shard {shown} resolves outside the model directory ({display(path)}); shards "
                         "are read only from inside it")
    if path == index.resolve():
        raise InputError(f"{where}: shard {shown} is the index itself")
    if not path.is_file():
        raise InputError(f"{where}: shard {shown} not found in {display(index.parent)}")
    return index.parent / shard  # not `path`: the format is read from the name, and a hub cache's blobs have none


def snapshot_blobs(directory: Path) -> Path | None:
    """The blobs/ folder into which the files of a hub cache snapshot (`<repo>/snapshots/<commit>/`) link."""
    blobs = directory.parent.parent / "blobs"
    return blobs.resolve() if directory.parent.name == "snapshots" and blobs.is_dir() else None


def open_index(path: Path) -> Checkpoint:
    """A sharded checkpoint: `{"weight_map": {tensor: shard file}}`, shards inside the index's directory, each
    tensor in the shard the index names."""
    where = display(path)
    index = read_json(path, "a weight index (JSON with a 'weight_map')")
    if not isinstance(index, dict) or "weight_map" not in index:
        raise InputError(f"{where}: not a weight index; expected a JSON object with a 'weight_map'")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{where}: weight_map must be a non-empty object {{tensor name: shard file}}, got "
                         f"{describe(weight_map)}")
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            check_shard_name(path, shard, tensor)  # refuses it
        by_shard.setdefault(shard, []).append(tensor)
    shards = []
    for shard, names in by_shard.items():
        shard_path = check_shard_name(path, shard, names[0])
        opened = (open_safetensors(shard_path, names) if shard_path.suffix == ".safetensors"
                  else open_torch(shard_path))
        absent = [name for name in names if name not in opened.infos]
        if absent:
            raise InputError(f"{where}: tensor {display(absent[0])} is not in shard {display(shard)}, where the index "
                             f"says it is{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}")
        shards.append((opened, names))
    infos = {name: opened.infos[name] for opened, names in shards for name in names}

    def read() -> dict[str, torch.Tensor]:
        tensors = {}
        for opened, names in shards:
            data = opened.read()
            tensors.update({name: data[name] for name in names})
        return tensors

    shard_of = {name: opened for opened, names in shards for name in names}

    def read_names(wanted) -> dict[str, torch.Tensor]:
        tensors = {}
        for opened in {id(shard_of[name]): shard_of[name] for name in wanted}.values():
            tensors.update(opened.read_names([name for name in wanted if shard_of[name] is opened]))
        return tensors

    streamable = all(opened.read_names is not None for opened, _ in shards)
    return Checkpoint(path, infos, read, read_names if streamable else None)


def find_weight_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise InputError(f"{display(directory)}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def rename(tensors: dict, rules: list[tuple[str, str]]) -> dict[str, tuple[str, object]]:
    """Map checkpoint names to runtime names with regex rules (first match wins; no match keeps the name).
    Returns {runtime name: (checkpoint name, tensor)} so errors can speak the checkpoint's language."""
    renamed = {}
    for name, tensor in tensors.items():
        target = name
        for pattern, replacement in rules:
            match = re.fullmatch(pattern, name)
            if match:
                target = match.expand(replacement)
                break
        renamed[target] = (name, tensor)
    return renamed


def require(tensors: dict, name: str, rank: int, source: str) -> torch.Size:
    """The shape of a tensor a loader needs, which must be present with `rank` dimensions."""
    if name not in tensors:
        raise InputError(f"{source}: missing weight {name}")
    shape = tensors[name].shape
    if len(shape) != rank:
        raise InputError(f"{source}: weight {name} has shape {tuple(shape)}, expected {rank} dimensions")
    if 0 in shape:
        raise InputError(f"{source}: weight {name} has shape {tuple(shape)}, with an empty dimension")
    return shape


def any_named(tensors: dict, pattern: str) -> bool:
    """Whether some tensor's name matches `pattern` (a regex for the whole name)."""
    return any(re.fullmatch(pattern, name) for name in tensors)


def mamba_block_shapes(tensors: dict, layer: str, first: str, d_model: int, width_of: str, source: str) -> dict:
    """The Mamba-1 block configuration a state dict implies, from mamba_ssm's mixer names: in_proj, conv1d, dt_proj
    and A_log of the first layer (names starting `first`, e.g. "layers.0."), biases of any layer (`layer`, a regex
    with the layer index as its group). `width_of` names what gave `d_model`, for the message."""
    prefix = first + "mixer."
    in_proj = require(tensors, prefix + "in_proj.weight", 2, source)
    if in_proj[0] == 0 or in_proj[0] % (2 * d_model) or in_proj[1] != d_model:
        raise InputError(f"{source}: weight {prefix}in_proj.weight has shape {tuple(in_proj)}, expected "
                         f"(2 x expand x {d_model}, {d_model}) for {width_of} width {d_model}")
    return dict(
        d_model=d_model,
        n_layer=layer_count(tensors, layer, source),
        d_state=require(tensors, prefix + "A_log", 2, source)[1],
        expand=in_proj[0] // 2 // d_model,
        d_conv=require(tensors, prefix + "conv1d.weight", 3, source)[2],
        dt_rank=require(tensors, prefix + "dt_proj.weight", 2, source)[1],
        conv_bias=any_named(tensors, layer + r"mixer\.conv1d\.bias"),
        bias=any_named(tensors, layer + r"mixer\.(in|out)_proj\.bias"),
    )


def layer_count(names, pattern: str, source: str) -> int:
    """The number of layers of a checkpoint whose names hold layer indices (`pattern`'s group 1): they must be
    0..n-1, none missing."""
    indices = set()
    for name in names:
        match = re.match(pattern, name)
        if match and len(match.group(1)) <= 6:
            indices.add(int(match.group(1)))
    if not indices:
        raise InputError(f"{source}: no layers found (expected weights named like {pattern.replace(chr(92), '')})")
    count = max(indices) + 1
    if len(indices) != count:
        absent = next(i for i in range(count) if i not in indices)
        raise InputError(f"{source}: layer {absent} is missing; layer indices must run from 0 to {count - 1} "
                         "without gaps")
    return count


@contextlib.contextmanager
def on_meta_device():
    """Modules built as shapes and dtypes only: on torch's meta device, allocating nothing, with `nn.init.normal_` a
    no-op on meta tensors (which hold no values to initialise: torch's meta `normal_` imports its decompositions on
    first use, seconds of start-up for nothing)."""
    original = nn.init.normal_

    def normal_(tensor, *args, **kwargs):
        return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

    nn.init.normal_ = normal_
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.init.normal_ = original


def check_memory(model: nn.Module, data_bytes: int, source: str) -> None:
    """The memory to allocate `model` (built on the meta device) and to read `data_bytes` must be available."""
    count = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    check_allocation(size + data_bytes, f"{source}: loading this model ({count:,} parameters)",
                     "; `mambaquant quantize SOURCE --stream --out DIR` quantizes a safetensors language model block "
                     "by block")


def tied_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def translate(name: str, rules: list[tuple[str, str]] | None) -> str:
    """A runtime name in the checkpoint's language (`rules`: runtime -> checkpoint, as for `rename`)."""
    return next(iter(rename({name: None}, rules))) if rules else name


def check_weights(expected: dict, tied: set[str], weights: dict[str, tuple[str, object]], source: str,
                  names: list[tuple[str, str]] | None = None) -> None:
    """Names, shapes and dtypes of `weights` ({runtime name: (checkpoint name, tensor or TensorInfo)}) against the
    model's `expected` state dict. Missing, unexpected, misshapen or wrongly typed tensors are errors; missing ones
    are named in the checkpoint's language with the rules `names` (runtime -> checkpoint names)."""
    missing = [translate(name, names) for name in expected if name not in weights and name not in tied]
    if missing:
        raise InputError(f"{source}: missing weight(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    unexpected = [display(original) for name, (original, _) in weights.items() if name not in expected]
    if unexpected:
        raise InputError(
            f"{source}: unexpected weight(s) {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''} "
            "for this architecture"
        )
    for name, (original, tensor) in weights.items():
        if name in tied:
            continue
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise InputError(f"{source}: weight {original} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(want.shape)}")
        if want.dtype.is_floating_point:
            if tensor.dtype not in FLOAT_DTYPES:
                raise InputError(f"{source}: weight {original} has dtype {dtype_name(tensor.dtype)}, expected a "
                                 "floating-point tensor (float32, float16, bfloat16 or float64)")
        elif tensor.dtype != want.dtype:
            raise InputError(f"{source}: weight {original} has dtype {dtype_name(tensor.dtype)}, expected "
                             f"{dtype_name(want.dtype)}")


def check_before_loading(make_model: Callable[[], nn.Module], weights: dict[str, tuple[str, object]],
                         data_bytes: int, source: str, names: list[tuple[str, str]] | None = None) -> None:
    """Before any data is read or the model allocated: the memory the model and the checkpoint's data need must be
    available, and the checkpoint's tensor infos must be the model's (see `check_weights`)."""
    with on_meta_device():
        model = make_model()
    check_memory(model, data_bytes, source)
    check_weights(model.state_dict(), tied_names(model), weights, source, names)


def assign_weights(model: nn.Module, weights: dict[str, tuple[str, torch.Tensor]], source: str) -> nn.Module:
    """Copy weights into the model, floating-point ones as float32. Missing, unexpected, misshapen, wrongly typed
    (an integer tensor where a float one goes) or non-finite tensors are errors."""
    tied = tied_names(model)
    check_weights(model.state_dict(), tied, weights, source)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, (original, tensor) in weights.items():
            if name in tied:
                continue
            copy_checked(targets[name], tensor, original, source)
    return model


def load_checked(make_model: Callable[[], nn.Module], checkpoint: Checkpoint, rules: list[tuple[str, str]],
                 source: str, names: list[tuple[str, str]] | None = None) -> nn.Module:
    """The model `make_model` builds, with the checkpoint's weights (renamed by `rules`; `names` the other way),
    every size checked first."""
    if checkpoint.read_names is None:
        check_before_loading(make_model, rename(checkpoint.infos, rules), checkpoint.nbytes, source, names)
        tensors = checkpoint.read()
        return assign_weights(make_model(), rename(tensors, rules), source).eval()
    # safetensors: one block's tensors read at a time into the model (a half-precision checkpoint is never held
    # whole beside its float32 copy)
    weights = rename(checkpoint.infos, rules)
    groups: dict[str, dict] = {}
    for name, (original, info) in weights.items():
        match = BLOCK_PREFIX.match(name)
        groups.setdefault(match.group(0) if match else "", {})[name] = (original, info)
    largest = max((sum(nbytes(info) for _, info in group.values()) for group in groups.values()), default=0)
    check_before_loading(make_model, weights, largest, source, names)
    model = make_model()
    tied = tied_names(model)
    check_weights(model.state_dict(), tied, weights, source)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for group in groups.values():
            data = checkpoint.read_names([original for original, _ in group.values()])
            for name, (original, _) in group.items():
                if name not in tied:
                    copy_checked(targets[name], data[original], original, source)
    return model.eval()


def copy_checked(target: torch.Tensor, tensor: torch.Tensor, original: str, source: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise InputError(f"{source}: weight {original} contains NaN or Inf")
    target.copy_(tensor)

