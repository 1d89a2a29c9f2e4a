import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambaquant.errors import InputError
from mambaquant.quant.gptq import gptq_quantize
from mambaquant.quant.quantizer import (
    ActivationQuantizer,
    QuantSpec,
    dequantize_weight,
    fake_quantize,
    fake_quantize_weight,
    percentile_range,
    scale_and_zero,
)

specs = st.builds(QuantSpec, bits=st.integers(2, 8), symmetric=st.booleans())


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**16), low=st.floats(-10, -0.1), high=st.floats(0.1, 10))
def test_round_trip_clamp_and_idempotence(spec, seed, low, high):
    x = torch.rand(500, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 30 - 15
    scale, zero = scale_and_zero(torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64), spec)
    q = fake_quantize(x, scale, zero, spec)
    representable_low, representable_high = (spec.qmin - zero) * scale, (spec.qmax - zero) * scale
    inside = (x >= representable_low) & (x <= representable_high)
    assert ((q - x).abs()[inside] <= scale / 2 + 1e-9).all()  # at most half a step inside the range
    assert torch.allclose(q[x > representable_high], representable_high)  # clamped outside it
    assert torch.allclose(q[x < representable_low], representable_low)
    assert torch.equal(fake_quantize(q, scale, zero, spec), q)  # idempotent
    assert len(q.unique()) <= 2**spec.bits


@pytest.mark.parametrize("bits", [0, 1, 9, "8"])
def test_bad_bit_widths(bits):
    with pytest.raises(InputError, match="bit width"):
        QuantSpec(bits)


def test_weight_quantization_per_channel_and_group():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w[3] *= 100  # one large output channel must not coarsen the others
    per_channel = fake_quantize_weight(w, QuantSpec(4, granularity="channel"))
    assert (per_channel[0] - w[0]).abs().max() <= w[0].abs().max() / 7 / 2 + 1e-6
    grouped = fake_quantize_weight(w, QuantSpec(4, granularity="group", group_size=16))
    assert (grouped - w).norm() < (per_channel - w).norm()


def test_activation_quantizer_static_and_dynamic():
    x = torch.randn(2, 10, 32)
    x[0, 3] *= 50  # a token-wise outlier
    static = ActivationQuantizer(QuantSpec(8))
    with pytest.raises(RuntimeError):
        static(x)
    static.observe(None, x)
    assert static.low == x.min() and static.high == x.max()
    dynamic = ActivationQuantizer(QuantSpec(8, granularity="token", dynamic=True))
    ordinary = [t for t in range(10) if t != 3]
    assert (dynamic(x)[1, ordinary] - x[1, ordinary]).abs().max() < (static(x)[1, ordinary] - x[1, ordinary]).abs().max()
    with pytest.raises(InputError):
        ActivationQuantizer(QuantSpec(8, granularity="token"))  # per token is dynamic


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=g) @ torch.randn(64, 64, generator=g)  # strongly correlated inputs
    w = torch.randn(32, 64, generator=g)
    spec = QuantSpec(4, granularity="channel")
    rtn = fake_quantize_weight(w, spec)
    codes, scale = gptq_quantize(w, x.T @ x / len(x), spec, block_size=16)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 7 and scale.shape == (32, 1)
    gptq = dequantize_weight(codes, scale)
    assert ((x @ gptq.T - x @ w.T).norm() < 0.8 * (x @ rtn.T - x @ w.T).norm())
    codes, scale = gptq_quantize(w, x.T @ x / len(x), QuantSpec(4, granularity="group", group_size=16), block_size=32)
    assert scale.shape == (32, 4, 1) and codes.abs().max() <= 7
    grouped = dequantize_weight(codes, scale)
    assert len(grouped[0, :16].unique()) <= 16 and torch.equal(grouped[:, :16], codes[:, :16].float() * scale[:, 0])


def test_static_per_position_ranges():
    x = torch.randn(4, 6, 8)
    x[:, 2] *= 40  # a position that always carries large values (a class token, say)
    quantizer = ActivationQuantizer(QuantSpec(8, granularity="position"))
    quantizer.observe(None, x[:2])
    quantizer.observe(None, x[2:])
    assert torch.equal(quantizer.high, x.amax(dim=(0, 2)))
    per_tensor = ActivationQuantizer(QuantSpec(8))
    per_tensor.observe(None, x)
    others = [0, 1, 3, 4, 5]
    assert (quantizer(x) - x)[:, others].abs().max() < (per_tensor(x) - x)[:, others].abs().max() / 10
    with pytest.raises(InputError, match="positions"):
        quantizer(torch.randn(1, 5, 8))


@given(st.integers(1, 3000), st.floats(50, 100), st.integers(0, 2**31 - 1))
def test_percentile_range_equals_torch_quantile(n, percentile, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    low, high = percentile_range(x, percentile)
    # the reference in float64: a float32 q moves the interpolation point, by more than 1e-4 in a sparse tail
    expected = torch.quantile(x.double(), torch.tensor([(100 - percentile) / 100, percentile / 100]).double())
    assert torch.allclose(torch.stack([low, high]).double(), expected, atol=1e-4)
