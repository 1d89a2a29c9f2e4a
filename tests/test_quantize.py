import pytest
import torch

from mambaquant.errors import InputError
from mambaquant.quantize import METHODS, QuantConfig, activation_sites, quantize

from .helpers import rel_err


def lm_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (4, 48), generator=g) for _ in range(2)]


def vim_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits,granularity", [("w8a8", "static"), ("w4a8", "token"), ("w4a16", "static"), ("w8a8", "auto")])
def test_every_method_runs_and_stays_close(small_lm, small_vim, method, bits, granularity):
    for model, batches in ((small_lm, lm_batches()), (small_vim, vim_batches())):
        config = QuantConfig.preset(bits, method=method, granularity=granularity)
        quantized, report = quantize(model, config, batches)
        x = lm_batches(seed=9)[0] if model is small_lm else vim_batches(seed=9)[0]  # fresh inputs
        with torch.no_grad():
            out, reference = quantized(x), model(x)
        assert torch.isfinite(out).all()
        if method == "fp":
            assert torch.equal(out, reference)
            continue
        assert 0 < rel_err(out, reference) < (0.1 if bits == "w8a8" else 0.5), (method, bits)
        expected_sites = 0 if bits == "w4a16" else len(activation_sites(quantized))
        assert len(report.activation_sites) == expected_sites
        if granularity == "auto":
            assert len(report.granularity_reasons) == expected_sites


def test_quantize_is_reproducible_and_leaves_the_original_alone(small_lm):
    before = {k: v.clone() for k, v in small_lm.state_dict().items()}
    config = QuantConfig.preset("w4a8", method="mambaquant", granularity="auto", seed=3)
    a, _ = quantize(small_lm, config, lm_batches())
    b, _ = quantize(small_lm, config, lm_batches())
    x = lm_batches(seed=5)[0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert all(torch.equal(before[k], v) for k, v in small_lm.state_dict().items())


def test_bad_configs():
    with pytest.raises(InputError, match="expected one of fp, rtn"):
        QuantConfig(method="awq")
    with pytest.raises(InputError, match="bit width"):
        QuantConfig(weight_bits=9)
    with pytest.raises(InputError, match="unknown bit widths"):
        QuantConfig.preset("w3a3x")


def test_empty_calibration_is_refused(small_lm):
    with pytest.raises(InputError, match="calibration set is empty"):
        quantize(small_lm, QuantConfig(), [])
