"""Quantized checkpoints are verified, not trusted: every kind of corruption or tampering (flipped bits, swapped or
renamed tensors, wrong dtypes and shapes, out-of-range values, config.json fields of the wrong JSON type or value)
is refused with one line naming the problem, by `mambaquant.load` and by the real CLI (exit 2). And every method x
bit width that `quantize` accepts saves and reloads to bit-identical outputs, on a tied LM, a Vim and a tagger."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import mambaquant
from mambaquant.errors import InputError
from mambaquant.loaders.quantized import FORMAT_VERSION, pack_int4, tensor_sha256, unpack_int4
from mambaquant.runtime import (
    LMConfig,
    MambaLM,
    MambaTagger,
    TaggerConfig,
    VisionConfig,
    VisionMamba,
    init_weights,
)

from .cli_cases import assert_refused
from .helpers import MAMBA1_METHODS as METHODS

VOCAB = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for these tiny models: handing their tiny products to a thread pool costs more than it saves
    (20x slower with 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    """Tiny models: a tied-embedding LM, a Vim (fixed length: per-position ranges possible), a LayerNorm tagger with
    biases and a shared bidirectional scan. name -> (model, calibration, input maker)."""
    lm = init_weights(MambaLM(LMConfig(d_model=16, n_layer=2, d_state=4, vocab_size=VOCAB)), seed=3).eval()
    vim = init_weights(VisionMamba(VisionConfig(d_model=16, n_layer=1, d_state=4, img_size=16, patch_size=8, stride=8,
                                                num_classes=3)), seed=4).eval()
    tagger = init_weights(MambaTagger(TaggerConfig(d_model=16, n_layer=2, d_state=4, expand=1, bias=True,
                                                   x_proj_bias=True, conv="same", norm="layer",
                                                   bidirectional="shared", divide_out=False, vocab_size=VOCAB,
                                                   num_classes=3)), seed=5).eval()
    assert lm.config.tie_embeddings
    g = torch.Generator().manual_seed(0)
    tokens = lambda gen, n: torch.randint(0, VOCAB, (n, 12), generator=gen)  # noqa: E731
    images = lambda gen, n: torch.randn(n, 3, 16, 16, generator=gen)  # noqa: E731
    return {"lm": (lm, tokens(g, 4), tokens), "vim": (vim, images(g, 4), images),
            "tagger": (tagger, tokens(g, 4), tokens)}


# ---------------------------------------------------------------------------------------------------------------
# Item 7: every method x bit width saves and reloads to the same outputs
# ---------------------------------------------------------------------------------------------------------------

BIT_PAIRS = [(8, 8), (4, 8), (4, 4), (4, 16), (8, 16), (16, 8), (16, 16), (3, 8), (2, 16)]


@pytest.mark.parametrize("w_bits,a_bits", BIT_PAIRS, ids=[f"w{w}a{a}" for w, a in BIT_PAIRS])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["lm", "vim", "tagger"])
def test_every_method_and_bit_width_saves_and_reloads_identically(models, tmp_path, kind, method, w_bits, a_bits):
    model, calib, make_input = models[kind]
    quantized = mambaquant.quantize(model, method=method, w_bits=w_bits, a_bits=a_bits, calib=calib)
    mambaquant.save(quantized, tmp_path / "q")
    reloaded = mambaquant.load(str(tmp_path / "q"))
    x = make_input(torch.Generator().manual_seed(100 * METHODS.index(method) + BIT_PAIRS.index((w_bits, a_bits))), 2)
    with torch.no_grad():
        assert torch.equal(reloaded(x), quantized(x))
    assert reloaded.quantization_report.config == quantized.quantization_report.config
    stored = load_file(tmp_path / "q" / "model.safetensors")
    if kind == "lm" and quantized.config.tie_embeddings:  # the tied matrix is stored once
        assert ("embedding.weight" in stored) != ("lm_head.codes" in stored or "lm_head.codes_int4" in stored)
        assert "lm_head.weight" not in stored


def test_tied_full_precision_head_is_stored_once_and_retied(models, tmp_path):
    model, calib, _ = models["lm"]
    mambaquant.save(mambaquant.quantize(model, method="fp", w_bits=16, a_bits=16, calib=calib), tmp_path / "q")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert "embedding.weight" in stored and "lm_head.weight" not in stored
    reloaded = mambaquant.load(str(tmp_path / "q"))
    assert reloaded.lm_head.weight is reloaded.embedding.weight


def test_save_records_a_sha256_per_tensor(models, tmp_path):
    model, calib, _ = models["lm"]
    mambaquant.save(mambaquant.quantize(model, method="mambaquant", w_bits=4, calib=calib), tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert config["format_version"] == FORMAT_VERSION == 2
    assert config["layout"]["sha256"] == {name: tensor_sha256(tensor) for name, tensor in stored.items()}


def test_tensor_sha256_covers_dtype_shape_and_bytes():
    x = torch.arange(12, dtype=torch.int8)
    digests = {tensor_sha256(x), tensor_sha256(x.view(torch.uint8)), tensor_sha256(x.reshape(3, 4)),
               tensor_sha256(x.reshape(4, 3)), tensor_sha256(x.flip(0))}
    assert len(digests) == 5
    assert tensor_sha256(x.reshape(3, 4).t()) == tensor_sha256(x.reshape(3, 4).t().contiguous())
    bf16 = torch.randn(5, 3).bfloat16()
    assert tensor_sha256(bf16) != tensor_sha256(bf16.view(torch.int16)) and len(tensor_sha256(bf16)) == 64
    assert tensor_sha256(torch.tensor(1.0)) != tensor_sha256(torch.tensor([1.0]))


def test_int4_packing_round_trips_odd_counts():
    codes = torch.tensor([[-7, 7, 0], [3, -3, 1], [5, -1, 2]], dtype=torch.int8)
    packed = pack_int4(codes)
    assert len(packed) == 5 and int(packed[-1]) >> 4 == 8
    assert torch.equal(unpack_int4(packed, (3, 3)), codes)


# ---------------------------------------------------------------------------------------------------------------
# Item 3: corruption and tampering, refused with one line
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, models):
    """Checkpoints to corrupt: w4 (mambaquant W4A8 on the tied LM: packed int4 codes, rotations of h, S-SiLU
    smoothing, the tied head's input scale), w8 (QuaRot W8A8 on the tied LM: int8 codes), fp (weights in full
    precision, activations quantized at the sites)."""
    root = tmp_path_factory.mktemp("integrity")
    lm, calib, _ = models["lm"]
    recipes = {"w4": ("mambaquant", 4, 8), "w8": ("quarot", 8, 8), "fp": ("quarot", 16, 8)}
    for name, (method, w_bits, a_bits) in recipes.items():
        mambaquant.save(mambaquant.quantize(lm, method=method, w_bits=w_bits, a_bits=a_bits, calib=calib), root / name)
        mambaquant.load(str(root / name))  # each loads as saved
    vim, images, _ = models["vim"]
    mambaquant.save(per_position(vim, images), root / "vim")
    mambaquant.load(str(root / "vim"))
    return root


def per_position(vim, images):
    """MambaQuant W8A8 on the Vim with thresholds that make some sites' ranges per position."""
    quantized = mambaquant.quantize(vim, method="mambaquant", calib=images, token_outlier_share=0.0,
                                    token_outlier_ratio=1.5)
    assert any("per position" in d for d in quantized.quantization_report.activation_sites.values())
    return quantized


def test_per_position_ranges_save_and_reload_identically(models, tmp_path):
    vim, images, make_input = models["vim"]
    quantized = per_position(vim, images)
    mambaquant.save(quantized, tmp_path / "q")
    x = make_input(torch.Generator().manual_seed(1), 3)
    with torch.no_grad():
        assert torch.equal(mambaquant.load(str(tmp_path / "q"))(x), quantized(x))


def position_range(tensors) -> str:
    """The first per-position activation range (a vector, not a scalar) of a checkpoint."""
    return next(name.removesuffix(".low") for name, t in tensors.items() if name.endswith(".low") and t.dim() == 1)


def shorten_position_range(tensors):
    name = position_range(tensors)
    tensors[f"{name}.low"], tensors[f"{name}.high"] = tensors[f"{name}.low"][:-1], tensors[f"{name}.high"][:-1]


def disorder_position(tensors):
    name = position_range(tensors)
    low = tensors[f"{name}.low"].clone()
    low[2] = tensors[f"{name}.high"][2] + 1
    tensors[f"{name}.low"] = low


def read(directory):
    return json.loads((directory / "config.json").read_text()), load_file(directory / "model.safetensors")


def write(directory, config=None, tensors=None, rehash=False):
    """Rewrite a checkpoint's files; `rehash`: record the tensors' sha256 as save would, so that the check under
    test is reached past the hash check."""
    if tensors is not None:
        save_file(tensors, directory / "model.safetensors")
        if rehash:
            config = config or read(directory)[0]
            config["quantization_config"]["layout"]["sha256"] = {k: tensor_sha256(v) for k, v in tensors.items()}
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))


def edit_tensors(change):
    """A tampering of the tensors, the hashes recomputed."""
    def apply(directory):
        config, tensors = read(directory)
        change(tensors)
        write(directory, config, tensors, rehash=True)
    return apply


def edit_config(change):
    def apply(directory):
        config, _ = read(directory)
        change(config)
        write(directory, config)
    return apply


def layout(config):
    return config["quantization_config"]["layout"]


def data_section(path):
    data = path.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    return data, 8 + header_length, json.loads(data[8:8 + header_length])


def flip_bit(fraction):
    """Flip one bit at `fraction` of the way through the data section; returns the tensor it lands in."""
    def apply(directory):
        path = directory / "model.safetensors"
        data, start, header = data_section(path)
        offset = min(int(fraction * (len(data) - start)), len(data) - start - 1)
        data = bytearray(data)
        data[start + offset] ^= 0x10
        path.write_bytes(bytes(data))
        return next(name for name, entry in header.items()
                    if name != "__metadata__" and entry["data_offsets"][0] <= offset < entry["data_offsets"][1])
    return apply


def swap(first, second):
    def apply(tensors):
        tensors[first], tensors[second] = tensors[second], tensors[first]
    return apply


def swap_files(first, second):
    """Two tensors' data exchanged in the file, config.json left as saved."""
    def apply(directory):
        _, tensors = read(directory)
        swap(first, second)(tensors)
        write(directory, tensors=tensors)
    return apply


def rename(old, new):
    def apply(directory):
        _, tensors = read(directory)
        tensors[new] = tensors.pop(old)
        write(directory, tensors=tensors)
    return apply


def set_tensor(name, value):
    def apply(tensors):
        tensors[name] = value(tensors[name]) if callable(value) else value
    return apply


def set_element(name, index, value):
    def apply(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[index] = value
    return apply


def every_group_size(size: int):
    """quantization_config.weight_group_size and every quantized linear's group_size = size (a config that agrees
    with itself, not with the scales)."""
    def apply(config):
        q = config["quantization_config"]
        q["weight_group_size"] = size
        for entry in q["layout"]["linears"].values():
            if "float" not in entry:
                entry["group_size"] = size
    return apply


def set_field(path, value):
    """config[path...] = value (a path of keys; the last one may be deleted with value DELETE)."""
    def apply(config):
        target = config
        for part in path[:-1]:
            target = target[part]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return apply


def disorder(quantizer):
    """An activation range with its low end above its high end."""
    def apply(tensors):
        tensors[f"{quantizer}.low"] = tensors[f"{quantizer}.high"] + 1
    return apply


DELETE = object()
Q = ("quantization_config",)
L = ("quantization_config", "layout")
IN_PROJ = L + ("linears", "layers.0.mixer.in_proj")
HEAD = L + ("linears", "lm_head")
H_SITE = L + ("sites", "layers.0.mixer.ssm.h")
SPEC = IN_PROJ + ("input",)
HASHED = "does not match its recorded sha256"

# case -> (base checkpoint, tampering of the directory, words the one-line error must hold)
CASES = {
    # the bytes: caught by the hash (a flipped bit's words are completed with the tensor it lands in)
    **{f"flip bit at {f:.0%}": ("w4", flip_bit(f), [HASHED, "the file is corrupted or was modified"])
       for f in (0.0, 0.2, 0.45, 0.7, 0.999)},
    "flip bit in int8 codes": ("w8", flip_bit(0.5), [HASHED]),
    "swap layers' packed codes": ("w4", swap_files("layers.0.mixer.in_proj.codes_int4",
                                                   "layers.1.mixer.in_proj.codes_int4"),
                                  ["layers.0.mixer.in_proj.codes_int4", HASHED]),
    "swap layers' scales": ("w8", swap_files("layers.0.mixer.out_proj.scale", "layers.1.mixer.out_proj.scale"),
                            ["layers.0.mixer.out_proj.scale", HASHED]),
    "swap layers' smoothing scales": ("w4", swap_files("layers.0.mixer.gate_scale", "layers.1.mixer.gate_scale"),
                                      ["layers.0.mixer.gate_scale", HASHED]),
    "swap layers' float weights": ("fp", swap_files("layers.0.mixer.in_proj.weight", "layers.1.mixer.in_proj.weight"),
                                   ["layers.0.mixer.in_proj.weight", HASHED]),
    "renamed tensor": ("w4", rename("lm_head.scale", "lm_head.scales"),
                       ["missing tensor lm_head.scale", "corrupted or was modified"]),
    "extra tensor": ("w8", lambda d: write(d, tensors={**read(d)[1], "extra": torch.ones(2)}),
                     ["tensor extra", "no sha256 recorded"]),
    "truncated file": ("w8", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:-100]), ["unreadable safetensors"]),
    "missing hashes": ("w4", edit_config(set_field(L + ("sha256",), DELETE)), ["missing field 'sha256'"]),
    "one missing hash": ("w4", edit_config(set_field(L + ("sha256", "norm_f.weight"), DELETE)),
                         ["tensor norm_f.weight", "no sha256 recorded"]),
    "malformed hash": ("w4", edit_config(set_field(L + ("sha256", "norm_f.weight"), "abc")),
                       ['sha256["norm_f.weight"]', "64 lowercase hex digits"]),
    "hash of the wrong type": ("w4", edit_config(set_field(L + ("sha256",), ["abc"])),
                               ["layout.sha256: expected a JSON object, got a list"]),
    "deleted tensor, hashes recomputed": ("w4", edit_tensors(lambda t: t.pop("layers.1.mixer.gate_scale")),
                                          ["missing tensor layers.1.mixer.gate_scale", "this layout"]),
    "extra tensor, hashes recomputed": ("w4", edit_tensors(set_tensor("layers.0.mixer.gate_scale2", torch.ones(32))),
                                        ["unexpected tensor layers.0.mixer.gate_scale2"]),
    # dtypes and shapes against the layout and model_config (hashes recomputed)
    "scale of the wrong shape": ("w4", edit_tensors(set_tensor("lm_head.scale", torch.ones(64, 2))),
                                 ["lm_head.scale has shape (64, 2), expected (64, 1)"]),
    "scale transposed": ("w8", edit_tensors(set_tensor("lm_head.scale", lambda s: s.t().contiguous())),
                         ["lm_head.scale has shape (1, 64), expected (64, 1)"]),
    "scale as float16": ("w4", edit_tensors(set_tensor("lm_head.scale", lambda s: s.half())),
                         ["lm_head.scale has dtype float16, expected float32"]),
    "scale as float64": ("w8", edit_tensors(set_tensor("layers.0.mixer.in_proj.scale", lambda s: s.double())),
                         ["layers.0.mixer.in_proj.scale has dtype float64, expected float32"]),
    "int4 codes as int8": ("w4", edit_tensors(set_tensor("layers.0.mixer.in_proj.codes_int4",
                                                         lambda c: c.view(torch.int8))),
                           ["codes_int4 has dtype int8, expected uint8"]),
    "int4 codes as float": ("w4", edit_tensors(set_tensor("layers.0.mixer.in_proj.codes_int4", lambda c: c.float())),
                            ["codes_int4 has dtype float32, expected uint8"]),
    "int4 codes unpacked": ("w4", edit_tensors(set_tensor("lm_head.codes_int4",
                                                          lambda c: unpack_int4(c, (64, 16)).view(torch.uint8))),
                            ["lm_head.codes_int4 has shape (64, 16), expected (512,)"]),
    "int4 codes short": ("w4", edit_tensors(set_tensor("lm_head.codes_int4", lambda c: c[:-1].clone())),
                         ["lm_head.codes_int4 has shape (511,), expected (512,)"]),
    "int8 codes as int16": ("w8", edit_tensors(set_tensor("lm_head.codes", lambda c: c.short())),
                            ["lm_head.codes has dtype int16, expected int8"]),
    "int8 codes as uint8": ("w8", edit_tensors(set_tensor("lm_head.codes", lambda c: c.view(torch.uint8))),
                            ["lm_head.codes has dtype uint8, expected int8"]),
    "int8 codes transposed": ("w8", edit_tensors(set_tensor("lm_head.codes", lambda c: c.t().contiguous())),
                              ["lm_head.codes has shape (16, 64), expected (64, 16)"]),
    "range of the wrong shape": ("w4", edit_tensors(set_tensor("lm_head.input_quantizer.low", torch.zeros(2))),
                                 ["lm_head.input_quantizer.low has shape (2,), expected ()"]),
    "range as float64": ("fp", edit_tensors(set_tensor("layers.0.mixer.sites.x.op.high", lambda t: t.double())),
                         ["layers.0.mixer.sites.x.op.high has dtype float64, expected float32"]),
    "rotation of the wrong shape": ("w4", edit_tensors(set_tensor("layers.0.mixer.ssm.sites.h.op.0.matrix",
                                                                  torch.eye(3))),
                                    ["h.op.0.matrix has shape (3, 3), expected (4, 4)"]),
    "gate scale of the wrong shape": ("w4", edit_tensors(set_tensor("layers.0.mixer.gate_scale", torch.ones(16))),
                                      ["layers.0.mixer.gate_scale has shape (16,), expected (32,)"]),
    "float weight as float16": ("fp", edit_tensors(set_tensor("norm_f.weight", lambda t: t.half())),
                                ["norm_f.weight has dtype float16, expected float32"]),
    "float weight as int": ("w4", edit_tensors(set_tensor("layers.0.mixer.ssm.A_log", lambda t: t.long())),
                            ["layers.0.mixer.ssm.A_log has dtype int64, expected float32"]),
    "embedding of the wrong shape": ("fp", edit_tensors(set_tensor("embedding.weight", torch.zeros(64, 17))),
                                     ["embedding.weight has shape (64, 17), expected (64, 16)"]),
    "per-position range of the wrong length": ("vim", edit_tensors(shorten_position_range),
                                               [".low has shape (4,), expected (5,)"]),
    "per-position spec on a scalar range": ("vim", edit_config(lambda c: layout(c)["linears"]["head"]["input"].update(
        granularity="position", dynamic=False, observer="minmax")),
                                            ["head.input_quantizer.low has shape (), expected (5,)"]),
    # values (hashes recomputed)
    "non-orthogonal rotation": ("w4", edit_tensors(set_tensor("layers.1.mixer.ssm.sites.h.op.0.matrix",
                                                              lambda m: m * 1.5)),
                                ["layers.1.mixer.ssm.sites.h.op.0.matrix is not an orthogonal matrix"]),
    "singular rotation": ("w4", edit_tensors(set_tensor("layers.0.mixer.ssm.sites.h.op.0.matrix", torch.zeros(4, 4))),
                          ["not an orthogonal matrix", "max |R R^T - I| = 1"]),
    "rotation with NaN": ("w4", edit_tensors(set_element("layers.0.mixer.ssm.sites.h.op.0.matrix", 5, float("nan"))),
                          ["layers.0.mixer.ssm.sites.h.op.0.matrix contains NaN or Inf"]),
    "NaN scale": ("w4", edit_tensors(set_element("lm_head.scale", 3, float("nan"))),
                  ["lm_head.scale contains NaN or Inf"]),
    "Inf scale": ("w8", edit_tensors(set_element("layers.1.mixer.out_proj.scale", 0, float("inf"))),
                  ["layers.1.mixer.out_proj.scale contains NaN or Inf"]),
    "zero scale": ("w4", edit_tensors(set_element("lm_head.scale", 7, 0.0)),
                   ["lm_head.scale (weight scales) holds 0", "strictly positive"]),
    "negative scale": ("w8", edit_tensors(set_element("layers.0.mixer.ssm.x_proj.scale", 2, -0.5)),
                       ["layers.0.mixer.ssm.x_proj.scale (weight scales) holds -0.5", "strictly positive"]),
    "negative gate scale": ("w4", edit_tensors(set_element("layers.1.mixer.gate_scale", 0, -1.0)),
                            ["layers.1.mixer.gate_scale (S-SiLU smoothing scales) holds -1", "strictly positive"]),
    "min > max": ("w4", edit_tensors(disorder("lm_head.input_quantizer")),
                  ["activation range lm_head.input_quantizer is not ordered", "expected low <= high"]),
    "site range min > max": ("fp", edit_tensors(disorder("layers.0.mixer.sites.x.op")),
                             ["activation range layers.0.mixer.sites.x.op is not ordered"]),
    "infinite range": ("w8", edit_tensors(set_tensor("layers.0.mixer.ssm.sites.C.op.high", torch.tensor(float("inf")))),
                       ["layers.0.mixer.ssm.sites.C.op.high contains NaN or Inf"]),
    "int4 code -8": ("w4", edit_tensors(set_element("layers.0.mixer.out_proj.codes_int4", 0, 0)),
                     ["layers.0.mixer.out_proj.codes_int4 holds the code -8, outside the int4 range [-7, 7]"]),
    "int8 code -128": ("w8", edit_tensors(set_element("layers.1.mixer.in_proj.codes", 4, -128)),
                       ["layers.1.mixer.in_proj.codes holds the code -128, outside the int8 range [-127, 127]"]),
    "per-position min > max": ("vim", edit_tensors(disorder_position), ["is not ordered", "expected low <= high"]),
    "NaN in a float weight": ("fp", edit_tensors(set_element("layers.0.mixer.ssm.D", 0, float("nan"))),
                              ["layers.0.mixer.ssm.D contains NaN or Inf"]),
    # the format version
    "format version 1": ("w4", edit_config(set_field(Q + ("format_version",), 1)),
                         ["format version 1 was written by an older mambaquant; re-quantize"]),
    "format version 99": ("w4", edit_config(set_field(Q + ("format_version",), 99)), ["format version 99"]),
    "format version as a string": ("w4", edit_config(set_field(Q + ("format_version",), "2")),
                                   ['format version "2" is not supported']),
    "format version missing": ("w4", edit_config(set_field(Q + ("format_version",), DELETE)),
                               ["format version null is not supported"]),
    # quantization_config fields
    "method awq": ("w4", edit_config(set_field(Q + ("method",), "awq")),
                   ["quantization_config.method: expected one of 'fp', 'rtn'", 'got "awq"']),
    "w_bits 9": ("w4", edit_config(set_field(Q + ("w_bits",), 9)),
                 ["quantization_config.w_bits: expected an integer from 2 to 8 or 16, got 9"]),
    "a_bits as a string": ("w4", edit_config(set_field(Q + ("a_bits",), "8")),
                           ['a_bits: expected an integer', 'got "8"']),
    "a_bits true": ("w4", edit_config(set_field(Q + ("a_bits",), True)), ["a_bits: expected an integer", "got true"]),
    "w_bits null": ("w8", edit_config(set_field(Q + ("w_bits",), None)), ["w_bits: expected an integer", "got null"]),
    "weight rounding": ("w4", edit_config(set_field(Q + ("weight_rounding",), "nearest")),
                        ["weight_rounding: expected one of 'rtn', 'gptq'"]),
    "act granularity": ("w4", edit_config(set_field(Q + ("act_granularity",), "channel")),
                        ["act_granularity: expected one of 'tensor', 'token', 'auto'"]),
    "percentile NaN": ("w4", edit_config(set_field(Q + ("percentile",), float("nan"))),
                       ["quantization_config.percentile: expected a finite number > 50 and <= 100, got NaN"]),
    "group size a float": ("w4", edit_config(set_field(Q + ("weight_group_size",), 0.0)),
                           ["weight_group_size: expected an integer >= 0, got 0.0"]),
    "group size not dividing": ("w4", edit_config(set_field(Q + ("layout", "linears", "layers.0.mixer.in_proj",
                                                                     "group_size"), 3)),
                                ["group_size: 3 does not divide the input width 16"]),
    "group size not the run's": ("w4", edit_config(set_field(Q + ("weight_group_size",), 8)),
                                 ["group_size: 0, but quantization_config.weight_group_size 8 gives this linear groups "
                                  "of 8"]),
    "group size not matching the scales": ("w4", edit_config(every_group_size(1)),
                                           ["layers.0.mixer.in_proj.scale has shape (64, 1), expected (64, 16, 1)"]),
    "seed a float": ("w8", edit_config(set_field(Q + ("seed",), 1.5)), ["seed: expected an integer, got 1.5"]),
    "alpha a string": ("w8", edit_config(set_field(Q + ("alpha",), "0.5")), ["alpha: expected a finite number"]),
    "unknown field": ("w8", edit_config(set_field(Q + ("bits",), 8)), ["unknown field 'bits'"]),
    "missing field": ("w8", edit_config(set_field(Q + ("observer",), DELETE)), ["missing field 'observer'"]),
    "activation_sites a list": ("w4", edit_config(set_field(Q + ("activation_sites",), [])),
                                ["activation_sites: expected an object of strings, got a list []"]),
    "transforms a string": ("w4", edit_config(set_field(Q + ("transforms",), "rotations")),
                            ["transforms: expected a list of strings"]),
    "quantization_config a list": ("w4", edit_config(set_field(Q, [])),
                                   ["quantization_config: expected a JSON object, got a list"]),
    # the layout's fields
    "layout a list": ("w4", edit_config(set_field(L, [])), ["quantization_config.layout: expected a JSON object, "
                                                            "got a list"]),
    "bits 9": ("w4", edit_config(set_field(IN_PROJ + ("bits",), 9)),
               ['linears["layers.0.mixer.in_proj"].bits: expected an integer from 2 to 8, got 9']),
    "bits as a string": ("w4", edit_config(set_field(IN_PROJ + ("bits",), "8")),
                         ['linears["layers.0.mixer.in_proj"].bits: expected an integer', 'got "8"']),
    "bits true": ("w4", edit_config(set_field(HEAD + ("bits",), True)),
                  ['linears["lm_head"].bits: expected an integer from 2 to 8, got true']),
    "bits a float": ("w8", edit_config(set_field(HEAD + ("bits",), 8.0)), ['.bits: expected an integer', "got 8.0"]),
    "bits not w_bits": ("w4", edit_config(set_field(HEAD + ("bits",), 3)),
                        ['linears["lm_head"].bits: 3 bits, but quantization_config.w_bits is 4']),
    "linear entry a list": ("w4", edit_config(set_field(HEAD, [64, 16])),
                            ['linears["lm_head"]: expected a JSON object, got a list']),
    "linears a list": ("w4", edit_config(set_field(L + ("linears",), [])),
                       ["layout.linears: expected a JSON object, got a list"]),
    "linear shape a number": ("w4", edit_config(set_field(HEAD + ("shape",), 64)),
                              ['linears["lm_head"].shape: expected [out_features, in_features]']),
    "linear shape mismatch": ("w8", edit_config(set_field(HEAD + ("shape",), [64, 17])),
                              ['linears["lm_head"].shape: [64, 17], but model_config gives this linear the shape '
                               '[64, 16]']),
    "bias a string": ("w8", edit_config(set_field(HEAD + ("bias",), "false")),
                      ['linears["lm_head"].bias: expected true or false, got "false"']),
    "unknown linear": ("w4", edit_config(set_field(L + ("linears", "layers.7.mixer.in_proj"),
                                                   {"shape": [64, 16], "bits": 4, "bias": False, "input": None})),
                       ["has no linear layer layers.7.mixer.in_proj"]),
    "float linear flag false": ("fp", edit_config(set_field(L + ("linears", "layers.0.mixer.ssm.dt_proj", "float"),
                                                            False)),
                                ['linears["layers.0.mixer.ssm.dt_proj"].float: expected true, got false']),
    "input spec a list": ("w4", edit_config(set_field(SPEC, [8])),
                          ['linears["layers.0.mixer.in_proj"].input: expected null or a quantizer spec object']),
    "unknown granularity": ("w4", edit_config(set_field(SPEC + ("granularity",), "segment")),
                            ["input.granularity: expected one of 'tensor', 'position', 'token', 'group', 'channel'",
                             'got "segment"']),
    "per-channel ranges at a linear input": ("w4", edit_config(set_field(SPEC + ("granularity",), "channel")),
                                             ["per-channel activation ranges belong at a site, not at a linear "
                                              "input"]),
    "spec symmetric 1": ("w4", edit_config(set_field(SPEC + ("symmetric",), 1)),
                         ["input.symmetric: expected true or false, got 1"]),
    "spec percentile 200": ("w4", edit_config(set_field(SPEC + ("percentile",), 200)),
                            ["input.percentile: expected a finite number > 50 and <= 100, got 200"]),
    "spec observer": ("w8", edit_config(set_field(SPEC + ("observer",), "max")), ["input.observer: expected one of"]),
    "spec bits not a_bits": ("w8", edit_config(set_field(SPEC + ("bits",), 4)),
                             ["input.bits: 4 bits, but quantization_config.a_bits is 8"]),
    "spec static per token": ("w4", edit_config(set_field(SPEC + ("granularity",), "token")),
                              ["per-token activation scales are dynamic"]),
    "spec per position on an LM": ("w4", edit_config(set_field(SPEC + ("granularity",), "position")),
                                   ["per-position activation ranges need a fixed-length model"]),
    "spec unknown field": ("w4", edit_config(set_field(SPEC + ("zero_point",), 0)), ["unknown field 'zero_point'"]),
    "spec missing field": ("w4", edit_config(set_field(SPEC + ("dynamic",), DELETE)), ["missing field 'dynamic'"]),
    "sites a list": ("w4", edit_config(set_field(L + ("sites",), [])), ["layout.sites: expected a JSON object"]),
    "site ops an object": ("w4", edit_config(set_field(H_SITE, {"op": "rotate"})), ["expected a list of ops"]),
    "site op a string": ("w4", edit_config(set_field(H_SITE + (0,), "rotate")),
                         ['sites["layers.0.mixer.ssm.h"][0]: expected a JSON object, got a string']),
    "site op unknown": ("w4", edit_config(set_field(H_SITE + (0, "op"), "shift")),
                        ["[0].op: expected one of 'rotate', 'quantize'", 'got "shift"']),
    "rotate size a string": ("w4", edit_config(set_field(H_SITE + (0, "size"), "4")),
                             ['[0].size: expected an integer >= 1, got "4"']),
    "rotate size wrong": ("w4", edit_config(set_field(H_SITE + (0, "size"), 5)),
                          ["[0].size: 5, but the tensor at this site has 4 channels"]),
    "rotate matrix flag": ("w4", edit_config(set_field(H_SITE + (0, "matrix"), "yes")),
                           ['[0].matrix: expected true or false, got "yes"']),
    "rotate matrix flag false": ("w4", edit_config(set_field(H_SITE + (0, "matrix"), False)),
                                 ["unexpected tensor layers.0.mixer.ssm.sites.h.op.0.matrix"]),
    "quantize spec bits 9": ("w4", edit_config(set_field(H_SITE + (1, "spec", "bits"), 9)),
                             ["[1].spec.bits: expected an integer from 2 to 8, got 9"]),
    "unknown site": ("w4", edit_config(set_field(L + ("sites", "layers.0.mixer.nowhere"), [])),
                     ["has no site layers.0.mixer.nowhere"]),
    "gate scales a string": ("w4", edit_config(set_field(L + ("gate_scales",), "layers.0.mixer")),
                             ["layout.gate_scales: expected a list of strings"]),
    "gate scale of no mixer": ("w4", edit_config(set_field(L + ("gate_scales", 0), "layers.0.norm")),
                               ["has no mixer layers.0.norm"]),
    # model_config and the top level
    "d_model a string": ("w4", edit_config(set_field(("model_config", "d_model"), "16")),
                         ['model_config.d_model: expected an integer >= 1, got "16"']),
    "d_model wrong": ("w8", edit_config(set_field(("model_config", "d_model"), 32)),
                      ["shape", "but model_config gives this linear"]),
    "tie_embeddings a string": ("w4", edit_config(set_field(("model_config", "tie_embeddings"), "yes")),
                                ["model_config.tie_embeddings: expected true or false"]),
    "untied": ("w4", edit_config(set_field(("model_config", "tie_embeddings"), False)),
               ["missing tensor embedding.weight"]),
    "norm unknown": ("w4", edit_config(set_field(("model_config", "norm"), "batch")),
                     ["model_config.norm: expected one of 'rms', 'layer'"]),
    "n_layer huge": ("w8", edit_config(set_field(("model_config", "n_layer"), 10**9)),
                     ["model_config.n_layer is 1000000000, but the tensors are those of 2 layer(s)"]),
    "LM made bidirectional": ("w8", edit_config(set_field(("model_config", "bidirectional"), "shared")),
                              ["model_config does not describe a MambaLM", "causal"]),
    "model_config missing field": ("w8", edit_config(set_field(("model_config", "d_state"), DELETE)),
                                   ["model_config: missing field 'd_state'"]),
    "model_class unknown": ("w8", edit_config(set_field(("model_class",), "Transformer")),
                            ["model_class: expected one of 'MambaLM', 'Mamba2LM', 'HybridLM', 'VisionMamba'"]),
    "model_class swapped": ("w8", edit_config(set_field(("model_class",), "MambaTagger")),
                            ["model_config: missing field 'num_classes'"]),
}
# A broad share run through the real CLI too (every one of them would pass; this keeps the module fast)
CLI_CASES = [name for index, name in enumerate(CASES) if index % 3 != 2 or name.startswith("flip")]


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_checkpoint_is_refused_with_one_line(saved, tmp_path, cli, case):
    base, tamper, words = CASES[case]
    directory = tmp_path / "q"
    shutil.copytree(saved / base, directory)
    landed = tamper(directory)
    words = list(words) + ([f"tensor {landed} {HASHED}"] if case.startswith("flip") else [])
    with pytest.raises(InputError) as refusal:
        mambaquant.load(str(directory))
    message = str(refusal.value)
    assert "\n" not in message and message.startswith(str(directory)), message
    for word in words:
        assert word in message, (word, message)
    if case in CLI_CASES:
        assert_refused(cli.run("eval", str(directory)), *words)


def test_enough_cases_run_through_the_cli():
    assert len(CASES) >= 100 and len(CLI_CASES) >= 60


WRONG_TYPES = {bool: [1, "true"], int: ["8", True, 8.5], float: ["0.5", True], str: [1, None], dict: [[], "x"],
               list: [{}, 3], type(None): [1]}


def leaves(config):
    """(path, value) of every field of quantization_config and model_config that a wrong JSON type must not pass:
    all of quantization_config's own fields, every field of the first quantized linear, of its input spec, of each
    op at one site (a rotation and a quantizer), and of model_config."""
    q = config["quantization_config"]
    linear = "layers.0.mixer.in_proj"
    site = "layers.0.mixer.ssm.h"
    paths = [("quantization_config", k) for k in q if k != "format_version"]
    paths += [("quantization_config", "layout", k) for k in q["layout"]]
    paths += [("quantization_config", "layout", "linears", linear, k) for k in q["layout"]["linears"][linear]]
    paths += [("quantization_config", "layout", "linears", linear, "input", k)
              for k in q["layout"]["linears"][linear]["input"]]
    for index, op in enumerate(q["layout"]["sites"][site]):
        paths += [("quantization_config", "layout", "sites", site, index, k) for k in op]
        if op["op"] == "quantize":
            paths += [("quantization_config", "layout", "sites", site, index, "spec", k) for k in op["spec"]]
    paths += [("model_config", k) for k in config["model_config"]]
    for path in paths:
        value = config
        for part in path:
            value = value[part]
        yield path, value


def test_every_field_of_a_wrong_json_type_is_refused_naming_it(saved, tmp_path):
    directory = tmp_path / "q"
    shutil.copytree(saved / "w4", directory)
    original, _ = read(directory)
    tried = 0
    for path, value in leaves(original):
        for wrong in WRONG_TYPES[type(value)]:
            config = json.loads(json.dumps(original))
            set_field(path, wrong)(config)
            write(directory, config)
            with pytest.raises(InputError) as refusal:
                mambaquant.load(str(directory))
            message = str(refusal.value)
            assert "\n" not in message and "Error" not in message, (path, wrong, message)
            assert str(path[-1]) in message, (path, wrong, message)
            tried += 1
    assert tried > 100
