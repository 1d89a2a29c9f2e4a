"""typeseg's trained Mamba (PyPI `typeseg`, Apache-2.0): a Flax checkpoint flattened into `mamba_al.npz`.

Its block differs from Mamba-1: LayerNorm with bias (eps 1e-6), biases on all four linear layers, a centred
("same") depthwise conv, dt = softplus(.) + 1e-4, and a bidirectional scan that reuses the same SSM inputs and
parameters backwards in time, the two directions added. Flax `Dense` kernels are (in, out): transposed here.
Bytes are sanitised and compacted to 130 tokens before the embedding (`typeseg_tokens`).
"""

import importlib.util
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..memory import available_bytes
from ..memory import describe as describe_bytes
from ..runtime import MambaTagger, TaggerConfig
from ..schema import display
from .weights import Checkpoint, TensorInfo, assign_weights, check_before_loading, layer_count, require

BLOCK = "CheckpointMambaBlock1D_{}__"
ALLOWED_BYTES = sorted(set(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D, 0xA4})
PLACEHOLDER_BYTE = 0xA4  # typeseg's stand-in for any byte outside the allowed set
LAYER = r"CheckpointMambaBlock1D_(\d+)__"
MAX_MEMBER_BYTES = 4 * 1024**3  # the largest npz member read, decompressed
DEFLATE_MAX_RATIO = 1100  # deflate cannot expand data more than about 1032 times


def packaged_npz() -> Path:
    spec = importlib.util.find_spec("typeseg")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the typeseg package is not installed; pip install typeseg==0.2.7, or pass the npz path")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mamba_al.npz"


def is_typeseg_npz(tensors: dict) -> bool:
    return "Embed_0__embedding" in tensors or any(name.startswith("CheckpointMambaBlock1D_") for name in tensors)


def torch_dtype(dtype: np.dtype):
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except (TypeError, ValueError):
        return str(dtype)


def array_header(member, where: str, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """The shape, dtype and header length of an npy member, read from its header only."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise InputError(f"{where}: member {display(name)} has npy format version {version}; expected 1.0 or 2.0")
    return shape, dtype, member.tell()


def open_npz(path: Path) -> Checkpoint:
    """An npz archive opened for its arrays' names, shapes and dtypes: its zip directory and npy headers are read,
    and every member whose declared size is absurd (over 4 GiB or the memory available, more than deflate can
    produce from its compressed size, or other than its npy header implies) is refused before any data is read."""
    where = display(path)

    def unreadable(e: Exception) -> InputError:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return InputError(f"{where}: unreadable npz file ({reason}); expected a numpy .npz archive")

    limit = min(MAX_MEMBER_BYTES, available_bytes())
    members = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                name = info.filename
                if not name.endswith(".npy"):
                    raise InputError(f"{where}: member {display(name)} is not an .npy array")
                size = info.file_size
                if size > limit:
                    raise InputError(f"{where}: member {display(name)} declares {describe_bytes(size)} uncompressed, "
                                     f"more than the {describe_bytes(limit)} a member may have here")
                if info.compress_type == zipfile.ZIP_STORED and info.compress_size != size or (
                        info.compress_type == zipfile.ZIP_DEFLATED
                        and size > DEFLATE_MAX_RATIO * info.compress_size + 4096):
                    raise InputError(f"{where}: member {display(name)} declares {describe_bytes(size)} uncompressed "
                                     f"from {describe_bytes(info.compress_size)} stored: a corrupt archive")
                with archive.open(info) as member:
                    shape, dtype, header = array_header(member, where, name)
                if dtype.hasobject:
                    raise InputError(f"{where}: member {display(name)} holds Python objects; expected numbers")
                if header + math.prod(shape) * dtype.itemsize != size:
                    raise InputError(f"{where}: member {display(name)} has an npy header for shape {shape} "
                                     f"({dtype}) that does not match its size ({size} bytes): a corrupt archive")
                members[name[: -len(".npy")]] = (info, TensorInfo(shape, torch_dtype(dtype)))
    except InputError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError,
            zlib.error) as e:
        raise unreadable(e) from None
    infos = {name: info for name, (_, info) in members.items()}

    def read() -> dict[str, torch.Tensor]:
        tensors = {}
        try:
            with zipfile.ZipFile(path) as archive:
                for name, (info, tensor_info) in members.items():
                    if not isinstance(tensor_info.dtype, torch.dtype):
                        continue  # not a type torch holds: refused by name if a loader needs it
                    with archive.open(info) as member:
                        array = np.lib.format.read_array(member, allow_pickle=False)
                    tensors[name] = torch.from_numpy(np.ascontiguousarray(array, array.dtype.newbyteorder("=")))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
            raise unreadable(e) from None
        return tensors

    return Checkpoint(path, infos, read)


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    return open_npz(path).read()


def runtime_tensors(npz: dict, n_layer: int, source: str) -> dict[str, tuple[str, object]]:
    """typeseg's names and layouts -> ours: {runtime name: (npz name, tensor or TensorInfo)}."""

    def get(name: str, rank: int | None = None):
        if rank is not None:
            require(npz, name, rank, source)
        elif name not in npz:
            raise InputError(f"{source}: missing weight {name}")
        return npz[name]

    out = {
        "embedding.weight": ("Embed_0__embedding", get("Embed_0__embedding")),
        "norm_f.weight": ("LayerNorm_0__scale", get("LayerNorm_0__scale")),
        "norm_f.bias": ("LayerNorm_0__bias", get("LayerNorm_0__bias")),
        "head.weight": ("Dense_0__kernel", get("Dense_0__kernel", 2).T),
        "head.bias": ("Dense_0__bias", get("Dense_0__bias")),
    }
    linears = {"Dense_0": "mixer.in_proj", "Dense_1": "mixer.ssm.x_proj", "Dense_2": "mixer.ssm.dt_proj",
               "Dense_3": "mixer.out_proj"}
    for i in range(n_layer):
        p, q = BLOCK.format(i), f"layers.{i}."
        for flax, ours in linears.items():
            out[q + ours + ".weight"] = (p + flax + "__kernel", get(p + flax + "__kernel", 2).T)
            out[q + ours + ".bias"] = (p + flax + "__bias", get(p + flax + "__bias"))
        conv = get(p + "Conv_0__kernel", 3)  # (K, 1, E) -> (E, 1, K)
        out[q + "mixer.ssm.conv1d.weight"] = (p + "Conv_0__kernel", conv.permute(2, 1, 0))
        out[q + "mixer.ssm.conv1d.bias"] = (p + "Conv_0__bias", get(p + "Conv_0__bias"))
        out[q + "mixer.ssm.A_log"] = (p + "A_log", get(p + "A_log"))
        out[q + "mixer.ssm.D"] = (p + "D", get(p + "D"))
        out[q + "norm.weight"] = (p + "LayerNorm_0__scale", get(p + "LayerNorm_0__scale"))
        out[q + "norm.bias"] = (p + "LayerNorm_0__bias", get(p + "LayerNorm_0__bias"))
    return out


def tagger_config_from_npz(npz: dict, source: str = "npz") -> TaggerConfig:
    """typeseg's configuration from its arrays' shapes (tensors or TensorInfos)."""
    p = BLOCK.format(0)
    vocab, d_model = require(npz, "Embed_0__embedding", 2, source)
    in_kernel = require(npz, p + "Dense_0__kernel", 2, source)  # (D, 2E)
    if in_kernel[0] != d_model or in_kernel[1] == 0 or in_kernel[1] % (2 * d_model):
        raise InputError(f"{source}: weight {p}Dense_0__kernel has shape {tuple(in_kernel)}, expected "
                         f"({d_model}, 2 x expand x {d_model}) for the embedding's width {d_model}")
    values = dict(
        d_model=d_model,
        n_layer=layer_count(npz, LAYER, source),
        d_state=require(npz, p + "A_log", 2, source)[1],
        expand=in_kernel[1] // 2 // d_model,
        d_conv=require(npz, p + "Conv_0__kernel", 3, source)[0],
        dt_rank=require(npz, p + "Dense_2__kernel", 2, source)[0],
        bias=True,
        x_proj_bias=True,
        conv="same",
        dt_offset=1e-4,
        norm="layer",
        norm_eps=1e-6,
        bidirectional="shared",
        divide_out=False,
        vocab_size=vocab,
        num_classes=require(npz, "Dense_0__kernel", 2, source)[1],
    )
    return TaggerConfig.from_dict(values, where=f"{source} (the configuration its arrays imply)")


def load_typeseg(checkpoint: Checkpoint, source: str) -> MambaTagger:
    config = tagger_config_from_npz(checkpoint.infos, source)
    check_before_loading(lambda: MambaTagger(config), runtime_tensors(checkpoint.infos, config.n_layer, source),
                         checkpoint.nbytes, source)
    npz = checkpoint.read()
    return assign_weights(MambaTagger(config), runtime_tensors(npz, config.n_layer, source), source).eval()


def build_typeseg(npz: dict[str, torch.Tensor], source: str) -> MambaTagger:
    config = tagger_config_from_npz(npz, source)
    return assign_weights(MambaTagger(config), runtime_tensors(npz, config.n_layer, source), source).eval()


def typeseg_tokens(data: bytes) -> torch.Tensor:
    """Bytes -> typeseg's compact token ids: disallowed bytes become the placeholder, bytes >= 128 share one id."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    allowed = torch.zeros(256, dtype=torch.bool)
    allowed[ALLOWED_BYTES] = True
    raw = torch.where(allowed[raw], raw, torch.full_like(raw, PLACEHOLDER_BYTE))
    return torch.where(raw < 128, raw, torch.full_like(raw, 128))
