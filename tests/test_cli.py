import json

import pytest
import torch
from safetensors.torch import save_file

import mambaquant

from .helpers import run_cli


def test_eval_and_generate():
    code, out, _ = run_cli("eval", "mamba-shakespeare", "--json", "--eval-samples", "4")
    result = json.loads(out)
    assert code == 0 and result["model"] == "mamba-shakespeare" and result["metric"] == "bits_per_byte"
    assert result["samples"] == 4 and 1 < result["value"] < 3
    code, out, _ = run_cli("generate", "mamba-shakespeare", "--prompt", "ROMEO:", "--max-new-tokens", "40")
    assert code == 0 and out.startswith("ROMEO:") and len(out) > 30


def test_generate_at_a_vanishing_temperature_is_greedy():
    """A temperature so small that logits / T overflows is greedy decoding in effect, not a NaN traceback."""
    args = ("generate", "mamba-shakespeare", "--prompt", "ROMEO:", "--max-new-tokens", "24", "--temperature")
    code, greedy, stderr = run_cli(*args, "0")
    assert code == 0, stderr
    for temperature in ("1e-40", "1e-300", "1e-45"):
        code, out, stderr = run_cli(*args, temperature)
        assert code == 0 and out == greedy, (temperature, stderr)


@pytest.fixture
def bad_inputs(tmp_path, small_lm):
    cases = {}
    cases["missing path"] = ([tmp_path / "nope"], "no such file or directory")
    (tmp_path / "empty").mkdir()
    cases["directory without config"] = ([tmp_path / "empty"], "no config.json")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    cases["unsupported architecture"] = ([llama], "unsupported architecture")
    good = mambaquant.save(small_lm, tmp_path / "good")
    for name, mutate, expected in [
        ("wrong shape", lambda t: t.update({"backbone.norm_f.weight": torch.ones(65)}), "has shape (65,), expected (64,)"),
        ("nan weight", lambda t: t["backbone.layers.0.mixer.D"].fill_(float("nan")), "contains NaN or Inf"),
        ("missing weight", lambda t: t.pop("backbone.layers.1.mixer.A_log"), "missing weight"),
    ]:
        directory = tmp_path / name.replace(" ", "_")
        directory.mkdir()
        (directory / "config.json").write_text((good / "config.json").read_text())
        tensors = mambaquant.loaders.read_tensors(good / "model.safetensors")
        mutate(tensors)
        save_file(tensors, directory / "model.safetensors")
        cases[name] = ([directory], expected)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((good / "config.json").read_text())
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:5000])
    cases["truncated weights"] = ([truncated], "unreadable safetensors")
    return cases


def test_bad_inputs_exit_2_with_one_line(bad_inputs):
    for case, (args, expected) in bad_inputs.items():
        code, _, err = run_cli("eval", *args)
        assert code == 2, case
        assert expected in err, (case, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (case, err)


@pytest.mark.parametrize("args,expected", [
    (["eval", "mamba-shakespeare", "--eval-samples", "0"], "expected a positive integer"),
    (["frobnicate"], "invalid choice"),
    (["generate", "mamba-shakespeare"], "--prompt"),
    (["generate", "typeseg", "--prompt", "x"], "needs a language model"),
])
def test_usage_errors_exit_2_with_one_line(args, expected):
    code, _, err = run_cli(*args)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
