"""`decide`: a recipe's optional parts kept only where they lower the output error on calibration inputs held back
from the fit (never evaluation data), by cross-validation, dropped only where they do nothing or hurt beyond noise;
what was kept and dropped in the report, saved with the checkpoint."""

import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.methods import decide as decide_module
from mambaquant.methods.config import QuantConfig
from mambaquant.methods.decide import FOLDS, MIN_FOLDS, decide, optional_parts, split_folds
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


def test_every_calibration_input_is_held_back_once_and_never_fit_where_it_is(model, monkeypatch):
    batches = [calib(6, seed=1), calib(6, seed=2)]
    rows = lambda tensors: [tuple(x.tolist()) for batch in tensors for x in batch]  # noqa: E731
    folds = split_folds(batches)
    assert len(folds) == FOLDS
    for fit, held in folds:
        assert len(rows(held)) == 3 and len(rows(fit)) == 9
        assert set(rows(held)) | set(rows(fit)) == set(rows(batches)) and not set(rows(held)) & set(rows(fit))
    assert sorted(row for _, held in folds for row in rows(held)) == sorted(rows(batches))
    assert len(split_folds([calib(2)])) == 2  # fewer inputs than folds: one held back in each

    fits, seen = [], []
    run_recipe = decide_module.run_recipe
    monkeypatch.setattr(decide_module, "run_recipe",
                        lambda model, config, fit: fits.append(rows(fit)) or run_recipe(model, config, fit))
    monkeypatch.setattr(decide_module, "held_back_errors",
                        lambda quantized, inputs, reference: seen.append(rows(inputs)) or torch.rand(len(rows(inputs))))
    decide(model, QuantConfig(method="mambaquant+", w_bits=4, a_bits=4), batches)
    assert len(seen) == len(fits) and len(fits) <= FOLDS * 4
    for fit, held in zip(fits, seen):
        assert held in [rows(h) for _, h in folds] and not set(fit) & set(held)


def test_a_difference_within_noise_keeps_the_recipe_as_designed_and_no_effect_drops_the_part(model, monkeypatch):
    """Errors that differ by noise alone (per input scattered both ways, on average nearly the same) keep the part;
    errors identical with and without a part drop it, after MIN_FOLDS folds."""
    monkeypatch.setattr(decide_module, "optional_parts", lambda config: [
        ("a part within noise", {"w_bits": 8}), ("a part that does nothing", {"seed": 1})])
    runs = []
    monkeypatch.setattr(decide_module, "run_recipe", lambda model, config, fit: runs.append(config) or (config, None))

    def held_back_errors(config, inputs, reference):  # "quantized" is the config here
        count = sum(map(len, inputs))
        return torch.tensor([0.7, 1.31] * (count // 2)) if config.w_bits == 8 else torch.ones(count)

    monkeypatch.setattr(decide_module, "held_back_errors", held_back_errors)
    config, lines = decide(model, QuantConfig(method="rtn", w_bits=4, a_bits=8, act_granularity="token"), [calib(16)])
    assert lines[1].startswith("kept a part within noise") and "within 2 standard errors" in lines[1]
    assert lines[2].startswith("dropped a part that does nothing: no effect")
    assert f"in {MIN_FOLDS} of {FOLDS} folds" in lines[2]
    assert (config.w_bits, config.seed) == (4, 1)
    assert len(runs) == 2 * FOLDS + MIN_FOLDS  # as designed and without the first part in every fold, then so many


def test_the_parts_each_recipe_may_drop():
    assert [change for _, change in optional_parts(QuantConfig(method="mambaquant+", w_bits=4, a_bits=4))] == [
        {"act_granularity": "token"}, {"clip_search": False}, {"site_bits": {}}, {"smooth": False}]
    assert [change for _, change in optional_parts(QuantConfig(method="mambaquant", w_bits=4, a_bits=16))] == [
        {"smooth": False}]
    assert optional_parts(QuantConfig(method="mambaquant", w_bits=4, a_bits=16, smooth=False)) == []
    assert optional_parts(QuantConfig(method="rtn")) == []


def test_decided_quantization_saves_what_it_decided(model, tmp_path):
    quantized = mambaquant.quantize(model, method="mambaquant+", w_bits=4, a_bits=4, calib=calib(), decide=True)
    report = quantized.quantization_report
    assert report.config["decide"] and len(report.decisions) == 5
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
