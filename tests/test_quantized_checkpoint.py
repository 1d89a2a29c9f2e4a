"""Quantized checkpoints (save -> reload gives the same model) and the int8 backend (the same numbers as the float
simulation), on every method and bit width, for a tied-head LM, a Vim and a LayerNorm tagger."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import mambaquant
from mambaquant.errors import InputError
from mambaquant.loaders.quantized import pack_int4, unpack_int4
from mambaquant.methods import set_backend
from mambaquant.runtime import LMConfig, MambaLM, MambaTagger, TaggerConfig, init_weights

from .helpers import MAMBA1_METHODS, run_cli


@pytest.fixture(scope="module")
def models():
    tied = init_weights(MambaLM(LMConfig(d_model=64, n_layer=2, d_state=8, vocab_size=256)), seed=4).eval()
    from mambaquant.runtime import VisionConfig, VisionMamba

    vim = init_weights(VisionMamba(VisionConfig(d_model=48, n_layer=2, d_state=8, img_size=32, patch_size=8,
                                                stride=8, num_classes=10)), seed=2).eval()
    tagger = init_weights(MambaTagger(TaggerConfig(d_model=32, n_layer=2, expand=1, bias=True, x_proj_bias=True,
                                                   conv="same", norm="layer", bidirectional="shared", divide_out=False,
                                                   vocab_size=256, num_classes=5)), seed=5).eval()
    g = torch.Generator().manual_seed(0)
    tokens = lambda n, length: torch.randint(0, 256, (n, length), generator=g)
    images = lambda n: torch.randn(n, 3, 32, 32, generator=g)
    return [("lm", tied, tokens(8, 40), tokens(2, 33)), ("vim", vim, images(8), images(2)),
            ("tagger", tagger, tokens(8, 40), tokens(2, 37))]


@pytest.mark.parametrize("method", MAMBA1_METHODS[1:])
@pytest.mark.parametrize("w_bits,a_bits,granularity", [(8, 8, None), (4, 8, "token"), (4, 16, None), (8, 8, "auto")])
def test_save_reload_and_int8_give_the_same_outputs(models, tmp_path, method, w_bits, a_bits, granularity):
    for name, model, calib, x in models:
        quantized = mambaquant.quantize(model, method=method, w_bits=w_bits, a_bits=a_bits, calib=calib,
                                        act_granularity=granularity)
        mambaquant.save(quantized, tmp_path / name)
        reloaded = mambaquant.load(str(tmp_path / name))
        with torch.no_grad():
            simulated = quantized(x)
            assert torch.equal(reloaded(x), simulated), (name, method)
            if a_bits <= 8:  # the int8 backend: the same integer sums, so the same numbers
                assert torch.equal(set_backend(reloaded, "int8")(x), simulated), (name, method)
        stored = load_file(tmp_path / name / "model.safetensors")
        codes = [k for k in stored if k.endswith((".codes", ".codes_int4"))]
        assert codes and all(stored[k].dtype == (torch.uint8 if w_bits == 4 else torch.int8) for k in codes)
        config = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert (config["method"], config["w_bits"], config["a_bits"]) == (method, w_bits, a_bits)
        assert (tmp_path / name / "MODEL_CARD.md").is_file()


@given(st.lists(st.integers(-8, 7), min_size=1, max_size=64))
def test_int4_packing_round_trips(values):
    codes = torch.tensor(values, dtype=torch.int8)[None]
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and len(packed) == (len(values) + 1) // 2
    assert torch.equal(unpack_int4(packed, tuple(codes.shape)), codes)


def test_tied_head_stores_one_matrix(models, tmp_path):
    _, lm, calib, _ = models[0]
    mambaquant.save(mambaquant.quantize(lm, method="rtn", calib=calib), tmp_path / "q")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert "embedding.weight" not in stored and stored["lm_head.codes"].shape == (256, 64)


def test_save_is_atomic_and_refuses_to_overwrite(models, tmp_path, monkeypatch):
    _, lm, calib, _ = models[0]
    quantized = mambaquant.quantize(lm, method="rtn", calib=calib)
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="already exists"):
        mambaquant.save(quantized, tmp_path / "taken")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mambaquant.loaders.shards.ShardFile.close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mambaquant.save(quantized, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no partial directory, no temporary left


def test_cli_quantize_out_then_eval_gives_the_same_metric(tmp_path):
    out = tmp_path / "q"
    code, stdout, _ = run_cli("quantize", "typeseg", "--method", "mambaquant", "--w-bits", "4", "--calib-samples", "4",
                              "--eval-samples", "2", "--json", "--out", out)
    assert code == 0, stdout
    in_memory = json.loads(stdout)
    for backend in ("fake", "int8"):
        code, stdout, _ = run_cli("eval", out, "--eval-samples", "2", "--json", "--backend", backend)
        assert code == 0 and json.loads(stdout)["value"] == in_memory["value"]
    code, _, err = run_cli("quantize", "typeseg", "--out", out)
    assert code == 2 and "already exists" in err


@pytest.fixture(scope="module")
def saved(tmp_path_factory, models):
    directory = tmp_path_factory.mktemp("saved") / "q"
    _, lm, calib, _ = models[0]
    mambaquant.save(mambaquant.quantize(lm, method="mambaquant", w_bits=4, calib=calib), directory)
    return directory


def broken_copies(saved, root):
    import shutil

    cases = {}

    def copy(name):
        target = root / name
        shutil.copytree(saved, target)
        return target

    target = copy("truncated")
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (target, "unreadable safetensors")
    target = copy("missing")
    tensors = load_file(target / "model.safetensors")
    del tensors["layers.0.mixer.out_proj.scale"]
    save_file(tensors, target / "model.safetensors")
    cases["missing"] = (target, "layers.0.mixer.out_proj.scale")
    target = copy("version")
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (target / "config.json").write_text(json.dumps(config))
    cases["version"] = (target, "format version 99")
    target = copy("mismatch")
    config = json.loads((target / "config.json").read_text())
    config["model_config"]["d_model"] = 80
    (target / "config.json").write_text(json.dumps(config))
    cases["mismatch"] = (target, "shape")
    return cases


def test_bad_checkpoints_exit_2_with_one_line(saved, tmp_path):
    for case, (directory, expected) in broken_copies(saved, tmp_path).items():
        code, _, err = run_cli("eval", directory, "--eval-samples", "1")
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (case, err)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_a_group_size_that_does_not_divide_a_layer_gives_it_channel_scales_and_the_checkpoint_loads(method, tmp_path):
    """mamba-shakespeare's dt_proj reads dt_rank 12 inputs: at weight_group_size 32 it is quantized per channel (GPTQ
    used to give it one group of 12 and the loader refused the checkpoint), and every linear says its own."""
    quantized = mambaquant.quantize("mamba-shakespeare", method=method, w_bits=4, a_bits=16, weight_group_size=32,
                                    calib_samples=2, calib_len=64)
    ssm = quantized.layers[0].mixer.ssm
    assert ssm.dt_proj.scale.shape == (384, 1) and ssm.x_proj.scale.shape == (44, 12, 1)
    assert any("per channel" in line and "dt_proj" in line for line in quantized.quantization_report.weights)
    mambaquant.save(quantized, tmp_path / "q")
    layout = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["layout"]["linears"]
    assert layout["layers.0.mixer.ssm.dt_proj"]["group_size"] == 0
    assert layout["layers.0.mixer.ssm.x_proj"]["group_size"] == 32
    x = torch.randint(0, 256, (1, 30))
    assert torch.equal(mambaquant.load(tmp_path / "q")(x), quantized(x))
    layout["layers.0.mixer.ssm.x_proj"]["group_size"] = 64  # a group size that is neither the run's nor 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["layout"]["linears"] = layout
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="group_size: 64, but quantization_config.weight_group_size 32 gives this "
                                         "linear groups of 32"):
        mambaquant.load(tmp_path / "q")
