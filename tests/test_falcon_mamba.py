"""FalconMamba (Mamba-1 blocks with weight-less RMS norms on dt, B and C): our runtime against transformers'
FalconMambaForCausalLM on random models, and every method keeping the function at 16 bits where the inner norms
move B/C/dt smoothing and rotation online."""

import json

import pytest
import torch
from transformers import FalconMambaConfig, FalconMambaForCausalLM

import mambaquant
from mambaquant.errors import InputError
from mambaquant.methods import METHODS, set_backend
from mambaquant.runtime import MambaLM

from .helpers import rel_err

SMALL = dict(hidden_size=64, num_hidden_layers=2, state_size=8, vocab_size=300, mixer_rms_eps=1e-6)


def random_falcon(seed: int = 0, **overrides) -> FalconMambaForCausalLM:
    torch.manual_seed(seed)
    config = FalconMambaConfig(initializer_range=0.02, **{**SMALL, **overrides})
    return FalconMambaForCausalLM(config).eval()


def ids(seed: int, shape=(2, 40), vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("tied", [True, False])
def test_object_and_directory_match_transformers(tied, tmp_path):
    reference = random_falcon(1, tie_word_embeddings=tied, mixer_rms_eps=1e-5)
    x = ids(2)
    expected = reference(x).logits
    ours = mambaquant.load(reference)
    assert isinstance(ours, MambaLM) and ours.config.mixer_rms_eps == 1e-5
    assert rel_err(ours(x), expected) < 1e-4
    reference.save_pretrained(tmp_path / "hf")
    reloaded = mambaquant.load(tmp_path / "hf")
    assert reloaded.config.mixer_rms_eps == 1e-5 and reloaded.config.tie_embeddings == tied
    assert rel_err(reloaded(x), expected) < 1e-4


@torch.no_grad()
def test_the_inner_norms_matter_and_a_saved_model_loads_in_transformers(tmp_path):
    reference = random_falcon(3)
    ours = mambaquant.load(reference)
    x = ids(4)
    plain = mambaquant.load(reference)
    for layer in plain.layers:
        layer.mixer.ssm.inner_norm_eps = 0.0
    assert rel_err(plain(x), ours(x)) > 1e-2  # without the norms it is another model
    mambaquant.save(ours, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "falcon_mamba" and config["mixer_rms_eps"] == 1e-6
    again = FalconMambaForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert rel_err(again(x).logits, reference(x).logits) < 1e-5


@pytest.mark.parametrize("method", [m for m in METHODS[1:] if m != "quamba2"])
def test_every_recipe_keeps_the_function_at_16_bits(method):
    model = mambaquant.load(random_falcon(5, tie_word_embeddings=False))
    x = ids(6)
    transformed = mambaquant.quantize(model, method=method, w_bits=16, a_bits=16, calib=ids(7, (4, 40)))
    with torch.no_grad():
        assert rel_err(transformed(x), model(x)) < 1e-4


def test_quamba2_is_refused_on_falcon_mamba_blocks():
    with pytest.raises(InputError, match="Mamba-2 blocks"):
        mambaquant.quantize(mambaquant.load(random_falcon(5)), method="quamba2", calib=ids(7, (4, 40)))


def test_the_dt_and_state_transforms_are_online_behind_the_norms():
    model = mambaquant.load(random_falcon(8))
    transformed = mambaquant.quantize(model, method="mambaquant", w_bits=16, a_bits=16, calib=ids(9, (4, 40)))
    ssm, original = transformed.layers[0].mixer.ssm, model.layers[0].mixer.ssm
    # x_proj is only rotated at its input (the x_proj_in Hadamard): its dt, B and C rows keep their norms' inputs
    assert ssm.sites["dt_low"].op is not None and ssm.sites["B"].op is not None and ssm.sites["C"].op is not None
    with torch.no_grad():
        u = torch.randn(3, 11, original.x_proj.in_features)
        rotated_input = ssm.sites["x_proj_in"](u)
        assert rel_err(ssm.x_proj(rotated_input), original.x_proj(u)) < 1e-4


@pytest.mark.parametrize("method", ["rtn", "mambaquant"])
def test_quantized_falcon_mamba_reloads_exactly_and_int8_is_bit_identical(method, tmp_path):
    model = mambaquant.load(random_falcon(10))
    quantized = mambaquant.quantize(model, method=method, w_bits=8, a_bits=8, calib=ids(11, (4, 40)))
    mambaquant.save(quantized, tmp_path / "q")
    reloaded = mambaquant.load(tmp_path / "q")
    assert reloaded.config.mixer_rms_eps == 1e-6
    x = ids(12)
    with torch.no_grad():
        expected = quantized(x)
        assert torch.equal(reloaded(x), expected)
        assert torch.equal(set_backend(reloaded, "int8")(x), expected)
        assert rel_err(expected, model(x)) < 0.2
