"""`decide`: a recipe's optional parts kept only where they lower the output error on calibration inputs held back
from the fit (never evaluation data); what was kept and dropped in the report, saved with the checkpoint."""

import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.methods import decide as decide_module
from mambaquant.methods.config import QuantConfig
from mambaquant.methods.decide import decide, optional_parts, split_held_back
from mambaquant.runtime import LMConfig

from .helpers import rel_err


@pytest.fixture(scope="module")
def model():
    return mambaquant.build(LMConfig(vocab_size=64, d_model=32, n_layer=2, d_state=8), seed=3)


def calib(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))


def test_a_part_that_hurts_on_the_held_back_inputs_is_dropped_and_one_that_helps_kept(model, monkeypatch):
    """Two stand-in parts with a known effect: 2-bit weights (dropping them, 8 bits, lowers the error) and 8-bit
    activations (dropping them, 2 bits, raises it)."""
    monkeypatch.setattr(decide_module, "optional_parts",
                        lambda config: [("2-bit weights", {"w_bits": 8}), ("8-bit activations", {"a_bits": 2})])
    config, lines = decide(model, QuantConfig(method="rtn", w_bits=2, a_bits=8, act_granularity="token"), [calib()])
    assert (config.w_bits, config.a_bits) == (8, 8)
    assert lines[1].startswith("dropped 2-bit weights") and lines[2].startswith("kept 8-bit activations")


def test_only_calibration_inputs_are_held_back_and_none_is_also_fit(model, monkeypatch):
    batches = [calib(6, seed=1), calib(6, seed=2)]
    fit, held = split_held_back(batches)
    rows = lambda tensors: [tuple(x.tolist()) for batch in tensors for x in batch]  # noqa: E731
    assert len(rows(held)) == 3 and len(rows(fit)) == 9
    assert set(rows(held)) | set(rows(fit)) == set(rows(batches)) and not set(rows(held)) & set(rows(fit))
    seen = []
    monkeypatch.setattr(decide_module, "output_error", lambda quantized, inputs, reference: seen.append(inputs) or 0.0)
    decide(model, QuantConfig(method="mambaquant+", w_bits=4, a_bits=4), batches)
    assert seen and all(rows(inputs) == rows(held) for inputs in seen)


def test_the_parts_each_recipe_may_drop():
    assert [change for _, change in optional_parts(QuantConfig(method="mambaquant+", w_bits=4, a_bits=4))] == [
        {"act_granularity": "token"}, {"clip_search": False}, {"site_bits": {}}]
    assert [change for _, change in optional_parts(QuantConfig(method="mambaquant", w_bits=4, a_bits=16))] == []
    assert optional_parts(QuantConfig(method="rtn")) == []


def test_decided_quantization_saves_what_it_decided(model, tmp_path):
    quantized = mambaquant.quantize(model, method="mambaquant+", w_bits=4, a_bits=4, calib=calib(), decide=True)
    report = quantized.quantization_report
    assert report.config["decide"] and len(report.decisions) == 4
    assert all(line.startswith(("kept", "dropped")) for line in report.decisions[1:])
    back = mambaquant.load(mambaquant.save(quantized, tmp_path / "q"))
    ids = calib(2, seed=9)
    assert back.quantization_report == report and torch.equal(back(ids), quantized(ids))
    assert "- decided: kept" in (tmp_path / "q" / "MODEL_CARD.md").read_text() or \
        "- decided: dropped" in (tmp_path / "q" / "MODEL_CARD.md").read_text()
    assert rel_err(quantized(ids), model(ids)) < 0.5


def test_what_decide_cannot_do_is_said_in_one_line(model, tmp_path):
    with pytest.raises(InputError, match="expected at least 2 calibration inputs"):
        mambaquant.quantize(model, method="mambaquant+", calib=calib(1), decide=True)
    with pytest.raises(InputError, match="decide must be true or false"):
        QuantConfig(decide="yes")
    source = mambaquant.save(model, tmp_path / "source")
    with pytest.raises(InputError, match="decide runs the recipe several times"):
        mambaquant.quantize(str(source), method="mambaquant+", calib=calib(), decide=True, out=tmp_path / "q",
                            stream=True)
    assert not (tmp_path / "q").exists()
