"""Streamed quantization (a checkpoint read one block at a time, written as it goes) against the in-memory path:
the same tensors and config, bit for bit, from float32, float16 and bfloat16 sources, for Mamba-1, FalconMamba and
Mamba-2; sharded outputs that reload; and the refusals that leave nothing on disk."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mambaquant
from mambaquant.errors import InputError
from mambaquant.loaders.streamed import StreamedCheckpoint
from mambaquant.methods.streamed import StreamedBlocks
from mambaquant.runtime import LMConfig, Mamba2LMConfig, MambaLM, init_weights

from .cli_cases import assert_refused

VOCAB = 300


def lm(kind: str, seed: int = 0, **overrides) -> MambaLM:
    if kind == "mamba2":
        config = Mamba2LMConfig(**{**dict(d_model=64, n_layer=3, d_state=16, head_dim=16, n_groups=2,
                                          vocab_size=VOCAB, tie_embeddings=False), **overrides})
    else:
        falcon = {"mixer_rms_eps": 1e-6} if kind == "falcon" else {}
        config = LMConfig(**{**dict(d_model=64, n_layer=3, d_state=8, vocab_size=VOCAB, tie_embeddings=False),
                             **falcon, **overrides})
    return init_weights(MambaLM(config), seed=seed).eval()


def saved(model: MambaLM, directory, dtype=torch.float32):
    """The model saved as a full-precision checkpoint in `dtype`."""
    mambaquant.save(model, directory)
    path = directory / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {name: f.get_tensor(name).to(dtype) for name in f.keys()}
    save_file(tensors, path)
    return directory


def calib(seed: int = 1, shape=(3, 32)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def read_all(directory) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(directory / name, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def assert_same_checkpoint(a, b) -> None:
    ta, tb = read_all(a), read_all(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


CASES = [("mamba1", "rtn", 8, 8, torch.bfloat16), ("mamba1", "mambaquant", 8, 8, torch.float16),
         ("mamba1", "gptq", 4, 16, torch.float32), ("mamba1", "quarot", 4, 8, torch.bfloat16),
         ("mamba1", "smoothquant", 8, 8, torch.float32), ("falcon", "mambaquant", 8, 8, torch.bfloat16),
         ("mamba2", "mambaquant", 8, 8, torch.bfloat16), ("mamba2", "quamba2", 4, 8, torch.float32),
         ("mamba1", "mambaquant+", 4, 4, torch.bfloat16), ("mamba2", "mambaquant+", 4, 4, torch.float16)]


@pytest.mark.parametrize("kind, method, w_bits, a_bits, dtype", CASES)
def test_streamed_equals_in_memory_bit_for_bit(kind, method, w_bits, a_bits, dtype, tmp_path):
    source = saved(lm(kind, tie_embeddings=method.startswith("mambaquant")), tmp_path / "source", dtype)
    options = dict(method=method, w_bits=w_bits, a_bits=a_bits, calib=calib())
    streamed = mambaquant.quantize(source, out=tmp_path / "streamed", stream=True, **options)
    in_memory = mambaquant.quantize(source, out=tmp_path / "in-memory", stream=False, **options)
    assert streamed == tmp_path / "streamed" and in_memory == tmp_path / "in-memory"
    assert_same_checkpoint(streamed, in_memory)
    reloaded = mambaquant.load(streamed)
    quantized = mambaquant.quantize(source, **options)
    with torch.no_grad():
        assert torch.equal(reloaded(calib(2)), quantized(calib(2)))


def test_a_sharded_output_reloads_and_equals_one_file(tmp_path):
    source = saved(lm("mamba1", d_model=128, n_layer=4, vocab_size=4096), tmp_path / "source", torch.bfloat16)
    options = dict(method="rtn", calib=calib(3) % VOCAB)
    sharded = mambaquant.quantize(source, out=tmp_path / "sharded", shard_size=2**20, **options)
    whole = mambaquant.quantize(source, out=tmp_path / "whole", stream=False, **options)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists() and (whole / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_all(sharded).values())
    assert_same_checkpoint(sharded, whole)
    x = calib(4)
    with torch.no_grad():
        assert torch.equal(mambaquant.load(sharded)(x), mambaquant.load(whole)(x))


def test_a_full_precision_save_is_sharded_too_and_reloads(tmp_path):
    model = lm("mamba1", d_model=128, n_layer=4, vocab_size=4096)
    mambaquant.save(model, tmp_path / "fp", shard_size=2**20)
    assert (tmp_path / "fp" / "model.safetensors.index.json").exists()
    x = calib(5)
    with torch.no_grad():
        assert torch.equal(mambaquant.load(tmp_path / "fp")(x), model(x))


def test_half_precision_loads_without_a_copy_of_the_checkpoint(tmp_path):
    model = lm("mamba1", seed=6)
    source = saved(model, tmp_path / "bf16", torch.bfloat16)
    loaded = mambaquant.load(source)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    expected = model.embedding.weight.to(torch.bfloat16).float()
    assert torch.equal(loaded.embedding.weight, expected)


def test_only_blocks_are_read_one_at_a_time(tmp_path, monkeypatch):
    source = saved(lm("mamba1", n_layer=4), tmp_path / "source", torch.bfloat16)
    reads = []
    original = StreamedCheckpoint.read

    def recording(self, weights):
        reads.append(sorted({name.split(".")[0] if not name[0].isdigit() else "block" for name in weights}))
        return original(self, weights)

    monkeypatch.setattr(StreamedCheckpoint, "read", recording)
    live = []
    original_load = StreamedBlocks.load

    def counting(self, index):
        live.append(sum(not next(layer.parameters()).is_meta for layer in self.model.layers))
        return original_load(self, index)

    monkeypatch.setattr(StreamedBlocks, "load", counting)
    mambaquant.quantize(source, method="mambaquant", out=tmp_path / "out", calib=calib())
    assert reads[0] == ["embedding", "lm_head", "norm_f"]  # the ends, once
    assert len(reads) == 1 + 2 * 4  # then every block twice: the covariance pass and the quantizing pass
    assert set(live) == {0}  # no other block in memory when one is read


@pytest.mark.parametrize("where", ["finish", "load"])
def test_an_interrupted_run_leaves_nothing(where, tmp_path, monkeypatch):
    source = saved(lm("mamba1"), tmp_path / "source")
    original = getattr(StreamedBlocks, where)

    def failing(self, index):
        if index == 1:
            raise InputError("interrupted")
        return original(self, index)

    monkeypatch.setattr(StreamedBlocks, where, failing)
    with pytest.raises(InputError, match="interrupted"):
        mambaquant.quantize(source, method="rtn", out=tmp_path / "out", calib=calib())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_refusals_before_any_work(tmp_path, monkeypatch):
    model = lm("mamba1")
    torch.save({f"backbone.{k}": v for k, v in model.state_dict().items()}, tmp_path / "model.pt")
    with pytest.raises(InputError, match="streamed quantization reads safetensors"):
        mambaquant.quantize(tmp_path / "model.pt", out=tmp_path / "a", stream=True, calib=calib())
    with pytest.raises(InputError, match="needs out"):
        mambaquant.quantize(tmp_path / "model.pt", stream=True, calib=calib())
    with pytest.raises(InputError, match="reads a checkpoint on disk"):
        mambaquant.quantize(model, out=tmp_path / "b", stream=True, calib=calib())
    source = saved(model, tmp_path / "source")
    tensors = read_all(source)
    tensors["backbone.layers.0.mixer.in_proj.weight"] = tensors["backbone.layers.0.mixer.in_proj.weight"].to(
        torch.int8)
    (tmp_path / "ints").mkdir()
    (tmp_path / "ints" / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, tmp_path / "ints" / "model.safetensors")
    with pytest.raises(InputError, match="dtype int8, expected a floating-point tensor"):
        mambaquant.quantize(tmp_path / "ints", out=tmp_path / "c", stream=True, calib=calib())
    monkeypatch.setattr("mambaquant.outputs.shutil.disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(InputError, match="on disk"):
        mambaquant.quantize(source, out=tmp_path / "d", calib=calib())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ints", "model.pt", "source"]


def test_the_cli_streams_into_a_directory_that_eval_reads(cli, tmp_path):
    source = saved(lm("falcon", seed=7), tmp_path / "source", torch.bfloat16)
    torch.save(calib(8), tmp_path / "calib.pt")
    out = tmp_path / "out"
    result = cli.run("quantize", source, "--stream", "--out", out, "--method", "rtn", "--calib", tmp_path / "calib.pt")
    assert result.code == 0, result.stderr[-2000:]
    assert "streaming 3 blocks" in result.stderr and f"wrote {out}" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"]["mixer_rms_eps"] == 1e-6
    evaluated = cli.run("eval", out, "--eval-samples", "2", "--json")
    assert evaluated.code == 0, evaluated.stderr[-2000:]
    assert_refused(cli.run("quantize", source, "--stream", "--method", "rtn"), "--out")
    assert_refused(cli.run("quantize", source, "--stream", "--out", tmp_path / "x", "--eval-samples", "3"),
                   "mambaquant eval")


def test_calibration_activations_can_be_held_in_bfloat16(tmp_path, monkeypatch):
    from mambaquant.methods import stages

    source = saved(lm("mamba1", seed=9), tmp_path / "source")
    held_dtypes = []
    original = stages.Runner.__init__

    def recording(self, stage, inputs, embedded=None):
        held_dtypes.extend({x.dtype for x in inputs})
        original(self, stage, inputs, embedded)

    monkeypatch.setattr(stages.Runner, "__init__", recording)
    out = mambaquant.quantize(source, method="mambaquant", calib=calib(), calib_dtype="bfloat16", out=tmp_path / "q")
    assert set(held_dtypes) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["quantization_config"]["calib_dtype"] == "bfloat16"
    monkeypatch.setattr(stages.Runner, "__init__", original)
    in_float32 = mambaquant.quantize(source, method="mambaquant", calib=calib())
    x = calib(10)
    with torch.no_grad():
        half, full = mambaquant.load(out)(x), in_float32(x)
    assert not torch.equal(half, full) and (half - full).norm() / full.norm() < 0.05
    with pytest.raises(InputError, match="calibration dtype"):
        mambaquant.quantize(source, calib=calib(), calib_dtype="float16")
