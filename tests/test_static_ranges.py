"""Static ranges that survive (issue 34, item 2): a site where one static range cannot hold the calibration tokens
is found, named in the report whatever the method, and, with `static_fallback` (mambaquant+'s default), given per
position ranges, 8 bits or per-token ranges, whichever comes first to hold it."""

import importlib.util
from pathlib import Path

import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.evaluation import evaluate
from mambaquant.methods import QuantConfig
from mambaquant.methods.granularity import STATIC_ERROR_LIMIT, StaticCheck, token_error
from mambaquant.quant.quantizer import ActivationQuantizer, QuantSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("train_generality", ROOT / "benchmarks" / "train_generality.py")
train_generality = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(train_generality)

# the time-series classifier's last block: its state barely decays, so a few signals' out_proj input and state
# reach ranges that round every other token to zero under one static scale
COLLAPSING = ("layers.1.mixer.out_proj_in", "layers.1.mixer.ssm.h")


def checked(tensors: list[torch.Tensor], bits: int, fallback: bool = True, per_position: bool = False):
    """A static per-tensor quantizer at `bits` and a `StaticCheck`, both fed `tensors` as calibration would."""
    config = QuantConfig(method="rtn", w_bits=8, a_bits=bits, static_fallback=fallback)
    quantizer = ActivationQuantizer(QuantSpec(bits))
    check = StaticCheck(config, per_position)
    observers = [quantizer.observe] + check.observers(quantizer)
    for x in tensors:
        for observe in observers:
            observe(None, x)
    return quantizer, check


def test_a_range_that_holds_is_kept_and_not_reported():
    g = torch.Generator().manual_seed(0)
    quantizer, check = checked([torch.randn(4, 32, 16, generator=g) for _ in range(3)], 8)
    assert check.check(quantizer) == (quantizer, None)


def test_ranges_growing_along_the_sequence_get_static_ranges_per_position():
    g = torch.Generator().manual_seed(1)
    growth = 1.2 ** torch.arange(64.0)[None, :, None]  # a state accumulating over a fixed-length sequence
    tensors = [torch.randn(4, 64, 16, generator=g) * growth for _ in range(3)]
    quantizer, check = checked(tensors, 8, per_position=True)
    assert token_error(quantizer, check.sample) > STATIC_ERROR_LIMIT
    chosen, line = check.check(quantizer)
    assert chosen.spec.granularity == "position" and not chosen.spec.dynamic and chosen.spec.bits == 8
    assert "does not hold" in line and "int8 static per position instead" in line
    fresh = torch.randn(2, 64, 16, generator=g) * growth  # and it holds on tokens it was not calibrated on
    error = ((chosen(fresh) - fresh).norm(dim=-1) / fresh.norm(dim=-1)).median()
    assert error < 0.05


def test_rare_large_tokens_at_4_bits_get_8_bits_and_static_stays_static():
    g = torch.Generator().manual_seed(2)
    tensors = []
    for _ in range(3):
        x = torch.randn(4, 32, 16, generator=g)
        x[:, ::16] *= 10  # a few tokens 10x the rest
        tensors.append(x)
    quantizer, check = checked(tensors, 4)
    chosen, line = check.check(quantizer)
    assert (chosen.spec.granularity, chosen.spec.dynamic, chosen.spec.bits) == ("tensor", False, 8)
    assert torch.equal(chosen.low, quantizer.low) and torch.equal(chosen.high, quantizer.high)
    assert "int8 static per tensor instead" in line


def test_a_range_no_static_scale_holds_falls_back_to_per_token_and_says_the_request_is_not_met():
    g = torch.Generator().manual_seed(3)
    tensors = []
    for _ in range(3):
        x = torch.randn(4, 32, 16, generator=g)
        x[0, 3] *= 1e4  # one token in a calibration batch, far beyond what 8 bits spread over
        tensors.append(x)
    quantizer, check = checked(tensors, 8)
    chosen, line = check.check(quantizer)
    assert chosen.spec.dynamic and chosen.spec.granularity == "token" and chosen.spec.bits == 8
    assert "the static request not met here" in line


def test_without_fallback_the_range_is_kept_and_the_report_says_what_per_token_would_give():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, 16, generator=g)
    x[0, 3] *= 1e4
    quantizer, check = checked([x], 8, fallback=False)
    chosen, line = check.check(quantizer)
    assert chosen is quantizer and "does not hold" in line and "dynamic per token would give" in line


@pytest.fixture(scope="module")
def timeseries():
    return train_generality.load_fixture("timeseries")


def quantized_timeseries(timeseries, **options):
    model, calib, _, _ = timeseries
    return mambaquant.quantize(model, w_bits=16, a_bits=8, calib=calib, calib_samples=len(calib),
                               act_granularity="tensor", **options)


def top1(timeseries, quantized) -> float:
    return evaluate(quantized, "fixture", eval_data=timeseries[2]).value


def test_every_method_names_the_sites_a_static_range_cannot_hold(timeseries):
    for method in ("rtn", "mambaquant"):
        quantized = quantized_timeseries(timeseries, method=method)
        report = quantized.quantization_report
        assert not report.config["static_fallback"]
        assert sorted(line.split(":")[0] for line in report.static_ranges) == sorted(COLLAPSING)
        assert top1(timeseries, quantized) < 30  # collapsed (FP 98.2 %, chance 22.6 %), and said so


def test_the_fallback_keeps_the_time_series_classifier(timeseries):
    quantized = quantized_timeseries(timeseries, method="rtn", static_fallback=True)
    report = quantized.quantization_report
    assert sorted(line.split(":")[0] for line in report.static_ranges) == sorted(COLLAPSING)
    for site in COLLAPSING:
        assert report.activation_sites[site] == "int8 symmetric, dynamic per token"
        assert "static request not met" in report.granularity_reasons[site]
    static = [d for site, d in report.activation_sites.items() if site not in COLLAPSING]
    assert static and all("static per tensor" in d for d in static)  # everything else as asked
    assert top1(timeseries, quantized) > 97  # FP 98.2 %


def test_mambaquant_plus_falls_back_by_default_and_the_checkpoint_keeps_it(timeseries, tmp_path):
    model, calib, (inputs, _), _ = timeseries
    quantized = mambaquant.quantize(model, method="mambaquant+", w_bits=8, a_bits=8, calib=calib,
                                    calib_samples=len(calib), act_granularity="tensor")
    report = quantized.quantization_report
    assert report.config["static_fallback"] and report.static_ranges
    loaded = mambaquant.load(mambaquant.save(quantized, tmp_path / "q"))
    assert loaded.quantization_report == report
    with torch.no_grad():
        assert torch.equal(loaded(inputs[:8]), quantized(inputs[:8]))
    card = (tmp_path / "q" / "MODEL_CARD.md").read_text()
    assert "- static ranges: layers.1.mixer." in card


def test_what_the_fallback_cannot_do_is_said_in_one_line():
    with pytest.raises(InputError, match="static_fallback must be true or false"):
        QuantConfig(static_fallback="yes")
    with pytest.raises(InputError, match="target vllm takes only its own activation scheme"):
        QuantConfig(method="quarot", w_bits=8, a_bits=8, target="vllm", act_granularity="tensor",
                    static_fallback=True)
    assert not QuantConfig(method="mambaquant+", w_bits=8, a_bits=8, target="vllm",
                           act_granularity="tensor").static_fallback
    assert not QuantConfig(method="mambaquant").static_fallback  # the paper's recipe as published
