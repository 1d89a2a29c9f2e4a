"""Malformed configs and checkpoints through the real CLI: every one exits 2 with one line naming the problem, no
traceback, and nothing large allocated before refusing (`assert_refused` bounds the child's peak RSS).

Covered: every config field of every model kind given as a string, a float, NaN, zero, a negative or a huge number,
a boolean or null; wrong JSON types; deep nesting; empty, truncated and non-UTF-8 files; sizes that do not match the
weights or that do not fit in memory; sharded indexes pointing at themselves, outside the model directory or at
missing tensors; bare Vim / LM / typeseg files missing each tensor a loader needs or holding it with the wrong rank;
integer-relabelled float tensors; npz members declaring absurd sizes; ambiguous and empty sources."""

import json
import math
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mambaquant
from mambaquant.errors import InputError
from mambaquant.loaders.hf import hf_state_dict
from mambaquant.loaders.vim import vim_state_dict
from mambaquant.runtime import (LMConfig, MambaLM, MambaTagger, TaggerConfig, VisionConfig, VisionMamba,
                                init_weights)

from .cli_cases import assert_refused

GiB = 1024**3


# ---------------------------------------------------------------------------------------------------------------
# tiny models, written once per module


def tiny_lm() -> MambaLM:
    config = LMConfig(d_model=16, n_layer=2, d_state=16, vocab_size=256, tie_embeddings=False)
    return init_weights(MambaLM(config), seed=0).eval()


def tiny_vim() -> VisionMamba:
    config = VisionConfig(d_model=16, n_layer=2, d_state=4, img_size=16, patch_size=8, stride=8, num_classes=10)
    return init_weights(VisionMamba(config), seed=1).eval()


def tiny_tagger() -> MambaTagger:
    config = TaggerConfig(d_model=16, n_layer=1, d_state=4, vocab_size=64, num_classes=3)
    return init_weights(MambaTagger(config), seed=2).eval()


def typeseg_arrays(d_model=16, n_layer=2, d_state=4, d_conv=4, dt_rank=1, vocab=130, classes=3) -> dict:
    """A small checkpoint with typeseg's flattened Flax names and layouts (Dense kernels are (in, out))."""
    rng = np.random.default_rng(0)
    E = d_model  # typeseg's expand is 1

    def rand(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    arrays = {"Embed_0__embedding": rand(vocab, d_model), "LayerNorm_0__scale": 1 + rand(d_model),
              "LayerNorm_0__bias": rand(d_model), "Dense_0__kernel": rand(d_model, classes),
              "Dense_0__bias": rand(classes)}
    for i in range(n_layer):
        p = f"CheckpointMambaBlock1D_{i}__"
        x_proj = dt_rank + 2 * d_state
        arrays |= {p + "Dense_0__kernel": rand(d_model, 2 * E), p + "Dense_0__bias": rand(2 * E),
                   p + "Dense_1__kernel": rand(E, x_proj), p + "Dense_1__bias": rand(x_proj),
                   p + "Dense_2__kernel": rand(dt_rank, E), p + "Dense_2__bias": rand(E),
                   p + "Dense_3__kernel": rand(E, d_model), p + "Dense_3__bias": rand(d_model),
                   p + "Conv_0__kernel": rand(d_conv, 1, E), p + "Conv_0__bias": rand(E),
                   p + "A_log": np.log(np.tile(np.arange(1, d_state + 1, dtype=np.float32), (E, 1))),
                   p + "D": 1 + rand(E), p + "LayerNorm_0__scale": 1 + rand(d_model),
                   p + "LayerNorm_0__bias": rand(d_model)}
    return arrays


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad")


@pytest.fixture(scope="module")
def good(root) -> dict:
    """Valid checkpoints of every kind, each loading cleanly: the starting points of the broken copies."""
    lm, vim, tagger = tiny_lm(), tiny_vim(), tiny_tagger()
    paths = {"hf": mambaquant.save(lm, root / "good-hf"), "vim": mambaquant.save(vim, root / "good-vim"),
             "tagger": mambaquant.save(tagger, root / "good-tagger")}
    ss = root / "good-ss"
    ss.mkdir()
    tensors = {k.replace("embeddings", "embedding"): v for k, v in hf_state_dict(lm).items()}
    save_file(tensors, ss / "model.safetensors")
    (ss / "config.json").write_text(json.dumps({"d_model": 16, "n_layer": 2, "vocab_size": 250, "ssm_cfg": {},
                                                "rms_norm": True, "pad_vocab_size_multiple": 8,
                                                "tie_embeddings": False}))
    paths["ss"] = ss
    paths["vim-file"] = root / "vim.pth"
    torch.save({"model": vim_state_dict(vim)}, paths["vim-file"])
    paths["lm-file"] = root / "lm.safetensors"
    save_file(hf_state_dict(lm), paths["lm-file"])
    paths["npz"] = root / "typeseg.npz"
    np.savez(paths["npz"], **typeseg_arrays())
    return paths


def test_the_good_checkpoints_load(good):
    for kind, path in good.items():
        model = mambaquant.load(path)
        assert isinstance(model, (MambaLM, VisionMamba, MambaTagger)), kind
    assert mambaquant.load(good["npz"]).config.n_layer == 2
    assert mambaquant.load(good["vim-file"]).config.img_size == 16


def copy_dir(good_dir: Path, root: Path, name: str) -> Path:
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(good_dir, target)
    return target


def with_config(good_dir: Path, root: Path, name: str, config=None, text: str | bytes | None = None) -> Path:
    """A copy of `good_dir` whose config.json is `config` (JSON) or the raw `text`."""
    target = copy_dir(good_dir, root, name)
    if text is None:
        text = json.dumps(config)
    (target / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return target


def case_id(value) -> str:
    return json.dumps(value)[:20]


# ---------------------------------------------------------------------------------------------------------------
# config fields, every kind: strings, floats, NaN, zero, negative, huge, booleans, null

HF_INTS = ["hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel", "time_step_rank", "vocab_size",
           "intermediate_size"]
HF_BOOLS = ["use_conv_bias", "use_bias", "tie_word_embeddings", "residual_in_fp32"]
SS_INTS = ["d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "ssm_cfg.d_state", "ssm_cfg.d_conv",
           "ssm_cfg.expand", "ssm_cfg.dt_rank"]
SS_BOOLS = ["rms_norm", "tie_embeddings", "ssm_cfg.conv_bias", "ssm_cfg.bias"]
OUR_INTS = ["d_model", "n_layer", "d_state", "expand", "d_conv", "img_size", "patch_size", "stride", "in_chans",
            "num_classes"]
OUR_BOOLS = ["conv_bias", "bias", "x_proj_bias", "divide_out"]
BAD_INTS = ["16", 16.0, float("nan"), 0, -4, 10**30, True, None, [16]]
BAD_FLOATS = ["1e-5", float("nan"), float("inf"), 0, -1e-5, 1e300, True]
BAD_BOOLS = [1, 0, "true", "false", None, [True]]
KINDS = {"hf": (HF_INTS, HF_BOOLS), "ss": (SS_INTS, SS_BOOLS), "vim": (OUR_INTS, OUR_BOOLS)}  # + tagger below


def set_field(config: dict, field: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *parents, name = field.split(".")
    target = config
    for parent in parents:
        target = target.setdefault(parent, {})
    target[name] = value
    return config


def field_cases():
    """(kind, field, bad value) for every field of every config kind."""
    for kind, (ints, bools) in KINDS.items():
        for field in ints:
            for value in BAD_INTS:
                if value is None and field == "intermediate_size":
                    continue  # null: not given
                yield kind, field, value
        for field in bools:
            for value in BAD_BOOLS:
                yield kind, field, value
    for kind, field in [("hf", "layer_norm_epsilon"), ("vim", "norm_eps"), ("tagger", "norm_eps")]:
        for value in BAD_FLOATS:
            yield kind, field, value
    for value in ["2", -0.1, float("nan"), 1.5, True]:
        yield "tagger", "dt_offset", value
    for field in ["vocab_size", "num_classes", "d_model", "dt_rank"]:
        for value in ["8", 8.5, -1, 10**9, False]:
            yield "tagger", field, value
    for kind, field, values in [("hf", "hidden_act", ["gelu", 1, None]), ("hf", "model_type", [7]),
                                ("hf", "architectures", ["MambaForCausalLM", [1], {"a": 1}]),
                                ("vim", "norm", ["batch", 1, None]), ("vim", "conv", ["full", True]),
                                ("vim", "bidirectional", ["both", 2]), ("tagger", "conv", ["causal ", []]),
                                ("ss", "ssm_cfg.layer", [2, None])]:
        for value in values:
            yield kind, field, value


FIELD_CASES = list(field_cases())


def cli_field_cases():
    """One bad value per field for the CLI, the kinds of bad value taken in turn."""
    seen = {}
    for kind, field, value in FIELD_CASES:
        seen.setdefault((kind, field), []).append(value)
    for i, ((kind, field), values) in enumerate(seen.items()):
        value = values[i % len(values)]
        yield pytest.param(kind, field, value, id=f"{kind}-{field}-{case_id(value)}")


@pytest.fixture(scope="module")
def base_configs(good) -> dict:
    configs = {kind: json.loads((good[kind] / "config.json").read_text()) for kind in ("hf", "ss", "vim", "tagger")}
    configs["hf"]["architectures"] = ["MambaForCausalLM"]
    return configs


def bad_field_directory(good, base_configs, root, kind, field, value) -> Path:
    config = set_field(base_configs[kind], field, value)
    if kind == "hf" and field == "model_type":
        config["architectures"] = ["MambaForCausalLM"]
    return with_config(good[kind], root, f"field-{kind}", config)


@pytest.mark.parametrize("kind,field,value", list(cli_field_cases()))
def test_bad_config_field_is_refused_by_name(cli, good, base_configs, root, kind, field, value):
    directory = bad_field_directory(good, base_configs, root, kind, field, value)
    assert_refused(cli.run("eval", directory), "config.json", field, "must be")


def test_every_bad_value_of_every_field_is_refused_by_name(good, base_configs, root):
    """The whole matrix (kind x field x bad value), in this process: an InputError of one line naming the field."""
    for kind, field, value in FIELD_CASES:
        directory = bad_field_directory(good, base_configs, root, kind, field, value)
        with pytest.raises(InputError) as error:
            mambaquant.load(directory)
        message = str(error.value)
        assert "config.json" in message and field in message and "must be" in message, (kind, field, value, message)
        assert "\n" not in message
    assert len(FIELD_CASES) > 250


def test_intermediate_size_must_match_expand_times_hidden(cli, good, base_configs, root):
    directory = with_config(good["hf"], root, "inter", set_field(base_configs["hf"], "intermediate_size", 48))
    assert_refused(cli.run("eval", directory), "intermediate_size 48 is not expand x hidden_size")


@pytest.mark.parametrize("field", ["d_model", "n_layer", "vocab_size"])
def test_state_spaces_required_fields(cli, good, base_configs, root, field):
    config = dict(base_configs["ss"])
    del config[field]
    directory = with_config(good["ss"], root, "ss-required", config)
    assert_refused(cli.run("eval", directory), f"missing required field {field}")


@pytest.mark.parametrize("change,words", [
    ({"rms_norm": False}, "LayerNorm language models are not supported"),
    ({"ssm_cfg": {"layer": "Mamba2"}}, "the SSM's 32 channels do not split into heads of head_dim 64"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim": 8, "d_state": 16}}, "missing weight(s) backbone.layers.0.mixer.dt_bias"),
    ({"ssm_cfg": {"layer": "Mamba3"}}, "ssm_cfg.layer Mamba3 is not supported; expected Mamba1 or Mamba2"),
    ({"attn_layer_idx": [0]}, "attention layers"),
    ({"attn_layer_idx": 3}, "attn_layer_idx must be a list of integers"),
    ({"d_intermediate": 64}, "MLP"),
    ({"ssm_cfg": [1, 2]}, "ssm_cfg must be an object"),
    ({"ssm_cfg": None}, "ssm_cfg must be an object"),
    ({"vocab_size": 2**24, "pad_vocab_size_multiple": 3}, "padded"),
], ids=lambda v: case_id(v) if isinstance(v, dict) else None)
def test_state_spaces_unsupported_or_wrongly_typed(cli, good, base_configs, root, change, words):
    directory = with_config(good["ss"], root, "ss-change", {**base_configs["ss"], **change})
    assert_refused(cli.run("eval", directory), words)


def test_patch_larger_than_image(cli, good, base_configs, root):
    directory = with_config(good["vim"], root, "patch", {**base_configs["vim"], "patch_size": 32})
    assert_refused(cli.run("eval", directory), "patch_size 32 is larger than img_size 16")


# ---------------------------------------------------------------------------------------------------------------
# the config file itself


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_FILES = {
    "empty": (b"", "empty file"),
    "whitespace": (b"  \n\t", "empty file"),
    "truncated": (b'{"model_type": "mamba", "hidden_si', "not valid JSON"),
    "not utf-8": ('{"model_type": "mamba", "x": "\u00e9"}'.encode("latin-1"), "not UTF-8"),
    "binary": (bytes(range(256)), "not UTF-8"),
    "a list": (b"[1, 2, 3]", "expected a JSON object, got a list of 3 items"),
    "a string": (b'"mamba"', "expected a JSON object"),
    "null": (b"null", "expected a JSON object, got null"),
    "deeply nested": (deep(200_000).encode(), "nested too deeply"),
    "deeply nested field": (('{"model_type": "mamba", "hidden_size": ' + deep(500) + "}").encode(),
                            "hidden_size must be an integer"),
    "nested object": (('{"model_type": "mamba", "hidden_size": ' + '{"a":' * 900 + "1" + "}" * 901).encode(),
                      "hidden_size must be an integer"),
    "integer of 5000 digits": (('{"model_type": "mamba", "hidden_size": ' + "9" * 5000 + "}").encode(),
                               "not valid JSON"),
    "integer of 1000 digits": (('{"model_type": "mamba", "hidden_size": ' + "9" * 1000 + "}").encode(),
                               "an integer of 1000 digits"),
    "long string": (('{"model_type": "mamba", "hidden_size": "' + "x" * 100_000 + '"}').encode(),
                    "a string of 100000 characters"),
    "too large": (b'{"model_type": "mamba", "pad": "' + b" " * (17 * 1024**2) + b'"}', "too large"),
    "architectures an int": (b'{"architectures": 5}', "unsupported architecture unknown"),
    "no architecture": (b'{"hello": "world"}', "unsupported architecture unknown"),
    "rwkv": (b'{"model_type": "rwkv"}', "unsupported architecture rwkv"),
    "hybrid without its fields": (b'{"model_type": "jamba"}', "missing required field vocab_size"),
    # a Mamba-2 config of some TB over a tiny Mamba-1 checkpoint: the memory is checked before anything is read
    "mamba2 too large": (b'{"model_type": "mamba2", "hidden_size": 16384, "num_hidden_layers": 1024, '
                         b'"num_heads": 512}', "GiB of memory, and"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_config_file(cli, good, root, case):
    text, words = BAD_FILES[case]
    directory = with_config(good["hf"], root, "config-file", text=text)
    assert_refused(cli.run("eval", directory), words)


def test_config_json_that_is_a_directory(cli, good, root):
    directory = copy_dir(good["hf"], root, "config-dir")
    (directory / "config.json").unlink()
    (directory / "config.json").mkdir()
    assert_refused(cli.run("eval", directory), "no config.json")


# ---------------------------------------------------------------------------------------------------------------
# sizes: checked against the weights' headers and the memory before anything is allocated


@pytest.mark.parametrize("change", [
    {"hidden_size": 20000, "num_hidden_layers": 1, "intermediate_size": None, "time_step_rank": "auto"},
    {"vocab_size": 5_000_000},
    {"num_hidden_layers": 1},
    {"state_size": 1000},
], ids=case_id)
def test_config_not_matching_the_weights_is_refused_before_allocating(cli, good, base_configs, root, change):
    directory = with_config(good["hf"], root, "sizes", {**base_configs["hf"], **change})
    result = cli.run("eval", directory)
    assert_refused(result)  # bounded RSS: nothing of the configured size was allocated
    line = result.stderr.strip()
    assert any(words in line for words in ("has shape", "unexpected weight", "missing weight", "available")), line


@pytest.mark.parametrize("kind,change", [
    ("hf", {"hidden_size": 65536, "num_hidden_layers": 64, "intermediate_size": None}),
    ("ss", {"d_model": 65536, "n_layer": 64}),
    ("vim", {"d_model": 65536, "n_layer": 32, "dt_rank": 0}),
    ("vim", {"img_size": 8192, "patch_size": 1, "stride": 1, "d_model": 4096}),
    ("tagger", {"d_model": 65536, "n_layer": 32, "vocab_size": 2**24}),
], ids=lambda v: case_id(v) if isinstance(v, dict) else v)
def test_config_larger_than_memory_is_refused_by_the_memory_check(cli, good, base_configs, root, kind, change):
    directory = with_config(good[kind], root, f"huge-{kind}", {**base_configs[kind], **change})
    assert_refused(cli.run("eval", directory), "parameters) needs", "GiB of memory", "available")


# ---------------------------------------------------------------------------------------------------------------
# sharded indexes


def sharded(good_dir: Path, root: Path, name: str, weight_map=None, index=None, suffix="safetensors") -> Path:
    """A copy of `good_dir` with its weights split in two shards and an index `index` (default: the right one, or
    `weight_map` in it)."""
    target = copy_dir(good_dir, root, name)
    tensors = load_file(target / "model.safetensors")
    (target / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {f"model-0000{i + 1}-of-00002.{suffix}": names[i::2] for i in range(2)}
    right = {}
    for shard, shard_names in halves.items():
        part = {n: tensors[n] for n in shard_names}
        if suffix == "safetensors":
            save_file(part, target / shard)
        else:
            torch.save(part, target / shard)
        right |= {n: shard for n in shard_names}
    if index is None:
        index = {"metadata": {}, "weight_map": right if weight_map is None else weight_map(right)}
    index_name = "model.safetensors.index.json" if suffix == "safetensors" else "pytorch_model.bin.index.json"
    (target / index_name).write_text(index if isinstance(index, str) else json.dumps(index))
    return target


def first_to(shard: str):
    def change(right: dict) -> dict:
        first = sorted(right)[0]
        return {**right, first: shard}

    return change


def test_good_shards_load(good, root):
    expected = mambaquant.load(good["hf"]).state_dict()
    for suffix in ("safetensors", "bin"):
        model = mambaquant.load(sharded(good["hf"], root, f"shards-{suffix}", suffix=suffix))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


BAD_INDEXES = {
    "itself": (first_to("model.safetensors.index.json"), "is an index"),
    "another index": (first_to("pytorch_model.bin.index.json"), "is an index"),
    "absolute": (first_to("/etc/passwd.safetensors"), "absolute path"),
    "windows absolute": (first_to("C:\\weights\\model.safetensors"), "absolute path"),
    "dot dot": (first_to("../good-hf/model.safetensors"), "goes up a directory"),
    "dot dot inside": (first_to("sub/../../good-hf/model.safetensors"), "goes up a directory"),
    "empty name": (first_to(""), "must be a shard file name"),
    "int shard": (first_to(3), "must be a shard file name (a non-empty string), got 3 (an integer)"),
    "list shard": (first_to(["a.safetensors"]), "must be a shard file name"),
    "missing shard": (first_to("model-00009-of-00009.safetensors"), "not found"),
    "not a weight file": (first_to("config.json"), "is not a weight file"),
    "wrong shard": (lambda right: {k: "model-00001-of-00002.safetensors" for k in right}, "is not in shard"),
    "weight_map a list": (lambda right: sorted(right), "weight_map must be a non-empty object"),
    "weight_map empty": (lambda right: {}, "weight_map must be a non-empty object"),
    "weight_map a string": (lambda right: "model.safetensors", "weight_map must be a non-empty object"),
}


@pytest.mark.parametrize("case", BAD_INDEXES)
def test_bad_sharded_index(cli, good, root, case):
    weight_map, words = BAD_INDEXES[case]
    directory = sharded(good["hf"], root, "index", weight_map)
    assert_refused(cli.run("eval", directory), words)


@pytest.mark.parametrize("index,words", [
    ("", "empty file"), ("[1]", "not a weight index"), ('{"metadata": {}}', "not a weight index"),
    ('{"weight_map": {"a": ' * 5000, "nested too deeply"), ("{bad json", "not valid JSON"),
])
def test_unreadable_index(cli, good, root, index, words):
    assert_refused(cli.run("eval", sharded(good["hf"], root, "index-file", index=index)), words)


def test_shard_symlinked_outside_the_model_directory(cli, good, root):
    directory = sharded(good["hf"], root, "symlink", first_to("link.safetensors"))
    os.symlink(good["lm-file"], directory / "link.safetensors")
    assert_refused(cli.run("eval", directory), "resolves outside the model directory")


def test_index_given_as_a_file(cli, good, root):
    directory = sharded(good["hf"], root, "index-as-file", first_to("/abs.safetensors"))
    assert_refused(cli.run("eval", directory / "model.safetensors.index.json"), "absolute path")


# ---------------------------------------------------------------------------------------------------------------
# bare checkpoint files: every tensor a loader needs, with its rank


VIM_NEEDED = ["patch_embed.proj.weight", "pos_embed", "head.weight", "layers.0.mixer.in_proj.weight",
              "layers.0.mixer.A_log", "layers.0.mixer.conv1d.weight", "layers.0.mixer.dt_proj.weight",
              "cls_token", "norm_f.weight", "layers.1.mixer.D", "layers.1.mixer.A_b_log", "layers.0.mixer.conv1d.bias",
              "layers.1.norm.weight", "patch_embed.proj.bias", "head.bias"]
LM_NEEDED = ["backbone.embeddings.weight", "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.A_log",
             "backbone.layers.0.mixer.conv1d.weight", "backbone.layers.0.mixer.dt_proj.weight",
             "backbone.layers.1.mixer.D", "backbone.norm_f.weight", "backbone.layers.1.mixer.conv1d.bias",
             "backbone.layers.0.norm.weight", "lm_head.weight"]
NPZ_NEEDED = ["Embed_0__embedding", "Dense_0__kernel", "Dense_0__bias", "LayerNorm_0__scale", "LayerNorm_0__bias",
              "CheckpointMambaBlock1D_0__A_log", "CheckpointMambaBlock1D_0__Dense_0__kernel",
              "CheckpointMambaBlock1D_0__Dense_2__kernel", "CheckpointMambaBlock1D_0__Conv_0__kernel",
              "CheckpointMambaBlock1D_1__D", "CheckpointMambaBlock1D_1__Dense_3__bias",
              "CheckpointMambaBlock1D_1__LayerNorm_0__scale", "CheckpointMambaBlock1D_1__Conv_0__bias"]


def vim_tensors(good) -> dict:
    return torch.load(good["vim-file"], weights_only=True)["model"]


def write_vim(root: Path, name: str, tensors: dict) -> Path:
    path = root / f"{name}.pth"
    torch.save({"model": tensors}, path)
    return path


def write_lm(root: Path, name: str, tensors: dict) -> Path:
    path = root / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def write_npz(root: Path, name: str, arrays: dict) -> Path:
    path = root / f"{name}.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("name", VIM_NEEDED)
def test_bare_vim_missing_a_tensor(cli, good, root, name):
    tensors = vim_tensors(good)
    del tensors[name]
    result = cli.run("eval", write_vim(root, "vim-missing", tensors))
    # a tensor that only completes a branch (A_b_log) is named among the missing, as every other one
    assert_refused(result, "missing weight", name.split(".")[-1] if "A_b_log" in name else name)


@pytest.mark.parametrize("name", LM_NEEDED)
def test_bare_lm_missing_a_tensor(cli, good, root, name):
    tensors = load_file(good["lm-file"])
    del tensors[name]
    path = write_lm(root, "lm-missing", tensors)
    if name == "lm_head.weight":  # a checkpoint without a head is a tied one: it loads
        assert mambaquant.load(path).config.tie_embeddings
        return
    assert_refused(cli.run("eval", path), "missing weight", name)


@pytest.mark.parametrize("name", NPZ_NEEDED)
def test_typeseg_npz_missing_an_array(cli, root, name):
    arrays = typeseg_arrays()
    del arrays[name]
    assert_refused(cli.run("eval", write_npz(root, "npz-missing", arrays)), "missing weight", name)


WRONG_RANK = {  # kind -> {tensor: a shape of the wrong rank}
    "vim": {"patch_embed.proj.weight": (16, 3 * 64), "pos_embed": (5, 16), "layers.0.mixer.in_proj.weight": (64,),
            "layers.0.mixer.A_log": (32,), "layers.0.mixer.conv1d.weight": (32, 4), "head.weight": (10,),
            "layers.0.mixer.dt_proj.weight": (32, 1, 1)},
    "lm": {"backbone.embeddings.weight": (256,), "backbone.layers.0.mixer.in_proj.weight": (64, 16, 1),
           "backbone.layers.0.mixer.conv1d.weight": (32, 4), "backbone.layers.0.mixer.A_log": (32, 16, 1)},
    "npz": {"Embed_0__embedding": (130 * 16,), "CheckpointMambaBlock1D_0__Conv_0__kernel": (4, 16),
            "CheckpointMambaBlock1D_1__Dense_1__kernel": (16 * 9,), "Dense_0__kernel": (16, 3, 1)},
}


@pytest.mark.parametrize("kind,name", [(k, n) for k, names in WRONG_RANK.items() for n in names])
def test_bare_file_tensor_of_the_wrong_rank(cli, good, root, kind, name):
    shape = WRONG_RANK[kind][name]
    if kind == "vim":
        tensors = vim_tensors(good)
        tensors[name] = torch.zeros(shape)
        path = write_vim(root, "vim-rank", tensors)
    elif kind == "lm":
        tensors = load_file(good["lm-file"])
        tensors[name] = torch.zeros(shape)
        path = write_lm(root, "lm-rank", tensors)
    else:
        arrays = typeseg_arrays()
        arrays[name] = np.zeros(shape, np.float32)
        path = write_npz(root, "npz-rank", arrays)
    assert_refused(cli.run("eval", path), name, "has shape")


def test_bare_files_with_a_layer_gap(cli, good, root):
    tensors = {k.replace("layers.1.", "layers.2."): v for k, v in vim_tensors(good).items()}
    assert_refused(cli.run("eval", write_vim(root, "vim-gap", tensors)), "layer 1 is missing")
    tensors = {k.replace("layers.1.", "layers.3."): v for k, v in load_file(good["lm-file"]).items()}
    assert_refused(cli.run("eval", write_lm(root, "lm-gap", tensors)), "layer 1 is missing")
    arrays = {k.replace("Block1D_1__", "Block1D_5__"): v for k, v in typeseg_arrays().items()}
    assert_refused(cli.run("eval", write_npz(root, "npz-gap", arrays)), "layer 1 is missing")


def test_bare_files_with_odd_names_or_shapes(cli, good, root):
    tensors = load_file(good["lm-file"])
    tensors["backbone.layers.123456789012.mixer.D"] = torch.zeros(32)
    assert_refused(cli.run("eval", write_lm(root, "lm-long-index", tensors)), "unexpected weight")
    tensors = vim_tensors(good)
    tensors["pos_embed"] = torch.zeros(1, 6, 16)
    assert_refused(cli.run("eval", write_vim(root, "vim-grid", tensors)), "square grid")
    tensors["pos_embed"] = torch.zeros(1, 0, 16)
    assert_refused(cli.run("eval", write_vim(root, "vim-grid0", tensors)), "pos_embed")
    tensors = vim_tensors(good)
    tensors["patch_embed.proj.weight"] = torch.zeros(16, 3, 0, 0)
    assert_refused(cli.run("eval", write_vim(root, "vim-patch0", tensors)), "empty dimension")
    tensors = load_file(good["lm-file"])
    tensors["backbone.layers.0.mixer.in_proj.weight"] = torch.zeros(40, 16)
    assert_refused(cli.run("eval", write_lm(root, "lm-expand", tensors)), "in_proj.weight has shape (40, 16)")
    arrays = typeseg_arrays()
    arrays["CheckpointMambaBlock1D_0__A_log"] = np.zeros((16, 5000), np.float32)
    assert_refused(cli.run("eval", write_npz(root, "npz-dstate", arrays)), "d_state must be an integer from 1 to 1024")


PWNED = Path(tempfile.gettempdir()) / f"mambaquant-test-pwned-{os.getpid()}"


class PickledCall:
    """Unpickling this would run code (create PWNED): weights_only refuses it."""

    def __reduce__(self):
        return (Path.touch, (PWNED,))


def test_old_torch_format_loads(good, root):
    tensors = load_file(good["lm-file"])
    torch.save(tensors, root / "legacy.bin", _use_new_zipfile_serialization=False)
    assert mambaquant.load(root / "legacy.bin").config.n_layer == 2


def test_unrecognised_bare_files(cli, root):
    assert_refused(cli.run("eval", write_lm(root, "no-tensors", {})), "unrecognised checkpoint")
    assert_refused(cli.run("eval", write_lm(root, "foreign", {"encoder.weight": torch.zeros(2)})),
                   "unrecognised checkpoint")
    torch.save({"a": 1, "b": "text"}, root / "not-tensors.pt")
    assert_refused(cli.run("eval", root / "not-tensors.pt"), "expected a non-empty state dict of named tensors")
    torch.save([torch.zeros(2)], root / "a-list.pt")
    assert_refused(cli.run("eval", root / "a-list.pt"), "expected a non-empty state dict")
    assert_refused(cli.run("eval", write_npz(root, "foreign", {"x": np.zeros(3, np.float32)})),
                   "unrecognised npz")
    (root / "pickle.bin").write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))  # not a torch file: torch warns
    assert_refused(cli.run("eval", root / "pickle.bin"), "unreadable checkpoint (UnpicklingError)")
    (root / "code.bin").write_bytes(pickle.dumps(PickledCall(), protocol=2))
    assert_refused(cli.run("eval", root / "code.bin"), "unreadable checkpoint")
    assert not PWNED.exists()
    (root / "cfg.json").write_text("{}")
    assert_refused(cli.run("eval", root / "cfg.json"), "a JSON file is not a checkpoint")


GARBAGE = {"safetensors": ["unreadable safetensors"], "bin": ["unreadable checkpoint"],
           "pth": ["unreadable checkpoint"], "npz": ["unreadable npz"],
           "index.json": ["empty file", "not valid JSON", "not UTF-8"]}


@pytest.mark.parametrize("suffix", GARBAGE)
@pytest.mark.parametrize("content", [b"", b"\x00" * 7, bytes(range(256)) * 16], ids=["empty", "zeros", "bytes"])
def test_empty_and_garbage_files(cli, root, suffix, content):
    path = root / f"garbage.{suffix}"
    path.write_bytes(content)
    result = cli.run("eval", path)
    assert_refused(result)
    assert any(words in result.stderr for words in GARBAGE[suffix]), result.stderr


def test_empty_weights_in_a_directory(cli, good, root):
    directory = copy_dir(good["hf"], root, "empty-weights")
    (directory / "model.safetensors").write_bytes(b"")
    assert_refused(cli.run("eval", directory), "unreadable safetensors")
    save_file({}, directory / "model.safetensors")
    assert_refused(cli.run("eval", directory), "missing weight(s)")
    (directory / "model.safetensors").unlink()
    assert_refused(cli.run("eval", directory), "no weights found")


# ---------------------------------------------------------------------------------------------------------------
# dtypes: an integer label on float data is refused; fp16 / bf16 / fp64 are converted


@pytest.mark.parametrize("dtype,view", [("int32", torch.int32), ("int16", torch.int16), ("uint8", torch.uint8),
                                        ("int8", torch.int8), ("bool", torch.bool), ("float8_e4m3fn", None)])
def test_integer_relabelled_float_tensor_is_refused(cli, good, root, dtype, view):
    directory = copy_dir(good["hf"], root, "relabelled")
    tensors = load_file(directory / "model.safetensors")
    name = "backbone.layers.0.mixer.D"
    if view is None:
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        dtype = "F8_E4M3"
    elif view is torch.bool:
        tensors[name] = tensors[name] > 0
    elif view.itemsize == 4:
        tensors[name] = tensors[name].view(view)  # the same bytes, labelled I32
    else:
        tensors[name] = tensors[name].to(view)
    save_file(tensors, directory / "model.safetensors")
    assert_refused(cli.run("eval", directory), name, f"has dtype {dtype}", "expected a floating-point tensor")


def test_integer_tensors_in_bare_files_are_refused(cli, good, root):
    tensors = vim_tensors(good)
    tensors["head.weight"] = tensors["head.weight"].view(torch.int32)
    assert_refused(cli.run("eval", write_vim(root, "vim-int", tensors)), "head.weight has dtype int32")
    tensors = load_file(good["lm-file"])
    tensors["backbone.embeddings.weight"] = tensors["backbone.embeddings.weight"].view(torch.int32)
    assert_refused(cli.run("eval", write_lm(root, "lm-int", tensors)), "has dtype int32")
    arrays = typeseg_arrays()
    arrays["CheckpointMambaBlock1D_0__D"] = arrays["CheckpointMambaBlock1D_0__D"].view(np.int32)
    assert_refused(cli.run("eval", write_npz(root, "npz-int", arrays)), "CheckpointMambaBlock1D_0__D has dtype int32")
    arrays["CheckpointMambaBlock1D_0__D"] = np.array(["a"] * 16)
    assert_refused(cli.run("eval", write_npz(root, "npz-str", arrays)), "CheckpointMambaBlock1D_0__D has dtype")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_converted(good, root, dtype):
    directory = copy_dir(good["hf"], root, f"dtype-{dtype}".replace("torch.", ""))
    tensors = load_file(directory / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in tensors.items()}, directory / "model.safetensors")
    model = mambaquant.load(directory)
    reference = mambaquant.load(good["hf"])
    for name, tensor in reference.state_dict().items():
        assert model.state_dict()[name].dtype == torch.float32
        assert torch.equal(model.state_dict()[name], tensor.to(dtype).float()), name


# ---------------------------------------------------------------------------------------------------------------
# npz archives: declared sizes are checked from the zip directory and the npy headers before any data is read


def npz_with_declared_size(root: Path, name: str, declared: int) -> Path:
    """A typeseg npz whose zip directory says its first member decompresses to `declared` (< 4 GiB) bytes."""
    path = root / f"{name}.npz"
    np.savez_compressed(path, **typeseg_arrays())
    data = bytearray(path.read_bytes())
    end = data.rindex(b"PK\x05\x06")  # end of central directory record
    directory = struct.unpack_from("<I", data, end + 16)[0]  # offset of the first central directory entry
    assert data[directory:directory + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, directory + 24, declared)  # its uncompressed size
    path.write_bytes(bytes(data))
    return path


def npz_zip64_declared(root: Path, name: str, declared: int) -> Path:
    """A typeseg npz whose zip64 directory entry says one member decompresses to `declared` bytes."""
    path = root / f"{name}.npz"
    arrays = typeseg_arrays()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            with archive.open(key + ".npy", "w") as member:
                np.lib.format.write_array(member, array)
        archive.filelist[0].file_size = declared  # the central directory is written from this on close
    return path


def test_npz_member_declaring_more_than_the_limit(cli, root):
    assert_refused(cli.run("eval", npz_zip64_declared(root, "bomb64", 50 * GiB)), "declares 50.0 GiB uncompressed")


def test_npz_member_declaring_more_than_deflate_can_produce(cli, root):
    assert_refused(cli.run("eval", npz_with_declared_size(root, "bomb32", 0xFFFFFFF0)), "declares", "corrupt")


def test_npz_member_whose_header_does_not_match_its_size(cli, root):
    path = root / "header.npz"
    arrays = typeseg_arrays()
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in arrays.items():
            if key == "Embed_0__embedding":  # a header claiming 10^9 x 16 floats, then 8 KiB of data
                header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, 16)}
                with archive.open(key + ".npy", "w") as member:
                    np.lib.format.write_array_header_1_0(member, header)
                    member.write(array.tobytes())
                continue
            with archive.open(key + ".npy", "w") as member:
                np.lib.format.write_array(member, array)
    assert_refused(cli.run("eval", path), "Embed_0__embedding", "does not match its size")


def test_npz_with_objects_or_foreign_members(cli, root):
    arrays = typeseg_arrays()
    arrays["Embed_0__embedding"] = np.array([{"a": 1}, None], dtype=object)
    path = root / "objects.npz"
    np.savez(path, **arrays)
    assert_refused(cli.run("eval", path), "holds Python objects")
    path = write_npz(root, "foreign-member", typeseg_arrays())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("notes.txt", "hello")
    assert_refused(cli.run("eval", path), "notes.txt is not an .npy array")


# ---------------------------------------------------------------------------------------------------------------
# sources: empty, unknown, ambiguous with an embedded model


def test_empty_and_unknown_sources(cli):
    assert_refused(cli.run("eval", ""), "empty model source")
    assert_refused(cli.run("eval", "   "), "empty model source")
    assert_refused(cli.run("eval", "zoo:nope"), "no embedded model nope", "zoo:typeseg")
    assert_refused(cli.run("eval", "zoo:"), "no embedded model")
    assert_refused(cli.run("eval", "no\nsuch\nmodel"), "no such file or directory")
    assert_refused(cli.run("eval", "x" * 5000), "no such file or directory")
    assert_refused(cli.run("compare", "zoo:nope", "--methods", "rtn"), "no embedded model nope")


def test_a_local_directory_named_like_an_embedded_model_is_not_shadowed(cli, tmp_path, monkeypatch):
    (tmp_path / "typeseg").mkdir()
    result = cli.run("eval", "typeseg", cwd=tmp_path)
    assert_refused(result, "write ./typeseg for the path or zoo:typeseg for the embedded model")
    assert_refused(cli.run("eval", "./typeseg", cwd=tmp_path), "no config.json")
    assert_refused(cli.run("compare", "typeseg", "--methods", "rtn", cwd=tmp_path), "zoo:typeseg")
    monkeypatch.chdir(tmp_path)
    assert isinstance(mambaquant.load("zoo:typeseg"), MambaTagger)
    with pytest.raises(InputError, match="zoo:typeseg"):
        mambaquant.load("typeseg")


def test_embedded_names_still_load_by_name():
    assert isinstance(mambaquant.load("typeseg"), MambaTagger)
    assert isinstance(mambaquant.load("zoo:vim-cifar10"), VisionMamba)


@pytest.mark.parametrize("source", [None, 123, 1.5, b"typeseg", ["typeseg"], {"a": 1}])
def test_sources_of_the_wrong_type(source):
    with pytest.raises(InputError, match="expected a model source"):
        mambaquant.load(source)


def test_load_of_an_empty_string_or_a_missing_path():
    for source in ("", "  "):
        with pytest.raises(InputError, match="empty model source"):
            mambaquant.load(source)
    with pytest.raises(InputError, match="no such file or directory"):
        mambaquant.load(Path("typeseg"))  # a Path is a path, never an embedded model


def test_vision_options_are_checked(good):
    with pytest.raises(InputError, match="stride must be an integer"):
        mambaquant.load(good["vim-file"], stride="8")
    with pytest.raises(InputError, match="unknown option"):
        mambaquant.load(good["vim-file"], patch=8)
    with pytest.raises(InputError, match="img_size must be an integer"):
        mambaquant.load(good["vim-file"], img_size=0)
    assert mambaquant.load(good["vim-file"], stride=8, img_size=16).config.img_size == 16


def test_from_dict_checks_every_field():
    with pytest.raises(InputError, match=r"model config: d_model must be an integer from 1 to 65536, got '8'"):
        LMConfig.from_dict({"d_model": "8"})
    with pytest.raises(InputError, match="must be a JSON object"):
        VisionConfig.from_dict([1, 2])
    with pytest.raises(InputError, match="causal language model"):
        LMConfig.from_dict({"bidirectional": "shared"})
    assert VisionConfig.from_dict(VisionConfig().to_dict()) == VisionConfig()
    assert TaggerConfig.from_dict({"d_model": 8, "unknown": object()}).d_model == 8
    assert math.isclose(LMConfig.from_dict({"norm_eps": 1}).norm_eps, 1.0)
