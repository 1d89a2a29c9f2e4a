"""The int8 backend's kernels: `torch._int_mm` exact at the extreme codes, W8A8 / W4A8 bit-identical to the float
simulation (per channel and per group, static and dynamic input scales), weight-only linears within float32
precision of the dequantized product with no float copy of the weights, and a tied embedding that reads the
quantized head's codes (in memory and after reloading)."""

from pathlib import Path

import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.methods import set_backend
from mambaquant.quant import linear as linear_module
from mambaquant.quant.linear import QuantizedEmbedding, QuantizedLinear, limb_codes
from mambaquant.quant.quantizer import ActivationQuantizer, QuantSpec, quantize_weight
from mambaquant.runtime import LMConfig, MambaLM, init_weights


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("in_features", [8192, 16384])  # d_inner of the 7B Mambas, and twice that
def test_int_mm_sums_extreme_codes_exactly(rows, in_features):
    """All -128 / 127 codes at the widest inputs: the int32 sums must not saturate or drift (some oneDNN paths
    accumulate in int16 or convert to float)."""
    generator = torch.Generator().manual_seed(rows)
    q = torch.where(torch.rand(rows, in_features, generator=generator) < 0.5, -128, 127).to(torch.int8)
    q[0] = -128
    w = torch.where(torch.rand(in_features, 24, generator=generator) < 0.5, -128, 127).to(torch.int8)
    w[:, 0] = -128  # row 0 x column 0 is the largest sum there is: in_features * 2^14
    sums = torch._int_mm(q, w)
    assert sums.dtype == torch.int32
    assert torch.equal(sums.long(), q.long() @ w.long())
    assert sums[0, 0] == in_features * 128 * 128


def quantized_linear(bits=8, group=0, input_spec=None, seed=0, out_features=40, in_features=64):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    spec = QuantSpec(bits, granularity="group" if group else "channel", group_size=group or 128)
    codes, scale = quantize_weight(weight, spec)
    quantizer = None
    if input_spec is not None:
        quantizer = ActivationQuantizer(input_spec)
        quantizer.observe(None, 2 * torch.randn(4, in_features, generator=generator))
    return QuantizedLinear(codes, scale, torch.randn(out_features, generator=generator), bits, quantizer)


INPUTS = {"static per tensor": QuantSpec(8), "dynamic per token": QuantSpec(8, granularity="token", dynamic=True),
          "dynamic per tensor": QuantSpec(8, dynamic=True), "4-bit static per tensor": QuantSpec(4)}


@pytest.mark.parametrize("input_spec", INPUTS.values(), ids=INPUTS.keys())
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (8, 16), (4, 32)])
def test_integer_backend_equals_the_simulation_bit_for_bit(bits, group, input_spec):
    for seed in range(3):
        layer = quantized_linear(bits, group, input_spec, seed)
        x = 3 * torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(100 + seed))
        simulated = layer(x)
        layer.set_backend("int8")
        assert torch.equal(layer(x), simulated)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 16)])
def test_weight_only_integer_backend_is_within_float32_precision(bits, group):
    """Both backends against the dequantized product in float64: within max|x_row| * sum_k |w_nk| * 2^-23 (the
    limbs miss x by at most 2^-23 of the row's largest |x|, float32 rounding the rest)."""
    for seed in range(3):
        layer = quantized_linear(bits, group, None, seed, out_features=96, in_features=768)
        x = 3 * torch.randn(5, 768, generator=torch.Generator().manual_seed(seed))
        x[0, 0] = 200.0  # an outlier: the other inputs of its row keep only the precision relative to it
        weight = layer.dequantized_weight().double()
        reference = x.double() @ weight.T + layer.bias.double()
        bound = x.abs().amax(1, keepdim=True).double() * weight.abs().sum(1) * 2**-23 + 1e-6
        simulated = layer(x)
        layer.set_backend("int8")
        integer = layer(x)
        assert ((simulated - reference).abs() <= bound).all()
        assert ((integer - reference).abs() <= bound).all()
        assert not torch.equal(integer, simulated)  # a different kernel, not the simulation again


def test_limbs_reconstruct_the_input():
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 6)[:, None]
    limbs, scale = limb_codes(x)
    assert limbs.dtype == torch.int8 and limbs.shape == (3 * 6, 300) and limbs.abs().max() <= 127
    limb_scales = scale.double() / torch.tensor([1.0, 254.0, 254.0**2], dtype=torch.float64).view(3, 1, 1)
    rebuilt = (limbs.view(3, 6, 300).double() * limb_scales).sum(0)
    assert ((rebuilt - x.double()).abs() <= x.abs().amax(1, keepdim=True) * 2**-23).all()


def test_the_integer_backend_keeps_no_float_copy_of_a_weight():
    for input_spec in (None, QuantSpec(8)):
        layer = quantized_linear(4, 0, input_spec)
        x = torch.randn(3, layer.in_features)
        layer(x)  # the simulation caches a float copy ...
        layer.set_backend("int8")
        layer(x)  # ... which the integer backend drops, and makes none of its own
        floats = [t for t in layer.buffers() if t.is_floating_point() and t.numel() >= layer.codes.numel()]
        assert floats == [] and layer.codes.dtype == torch.int8


def test_a_broken_int_mm_is_one_clear_error(monkeypatch):
    """If this CPU's int8 product gives wrong sums, the int8 backend refuses, naming what works instead."""
    monkeypatch.setattr(linear_module, "INT8_KERNELS_CHECKED", None)
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: (a.float() @ b.float()).clamp(-2**15, 2**15 - 1).int())
    layer = quantized_linear(8, 0, QuantSpec(8))
    with pytest.raises(InputError, match="int8 matrix product.*--backend fake"):
        layer.set_backend("int8")


def tied_lm():
    model = init_weights(MambaLM(LMConfig(d_model=32, n_layer=2, vocab_size=96, tie_embeddings=True)), seed=0)
    return model.eval()


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 16)])
def test_tied_embedding_reads_the_quantized_heads_codes(w_bits, a_bits, tmp_path):
    model = tied_lm()
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    quantized = mambaquant.quantize(model, method="rtn", w_bits=w_bits, a_bits=a_bits, calib=calib, calib_samples=4)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    reloaded = mambaquant.load(mambaquant.save(quantized, tmp_path / "q"))
    for candidate in (quantized, reloaded):
        head, embedding = candidate.lm_head, candidate.embedding
        assert isinstance(embedding, QuantizedEmbedding) and embedding.codes is head.codes
        assert torch.equal(embedding(ids), head.dequantized_weight()[ids])
        assert not any(name.startswith("embedding.") for name in candidate.state_dict())
    expected = quantized(ids)
    assert torch.equal(reloaded(ids), expected)
    assert torch.allclose(set_backend(reloaded, "int8")(ids), expected, atol=1e-4, rtol=1e-4)


def test_a_loaded_quantized_model_holds_no_float_weight_matrix(tmp_path):
    model = tied_lm()
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    quantized = mambaquant.quantize(model, method="mambaquant", w_bits=4, a_bits=8, calib=calib, calib_samples=4,
                                    weight_rounding="rtn")
    reloaded = set_backend(mambaquant.load(mambaquant.save(quantized, tmp_path / "q")), "int8")
    reloaded(calib[:1])
    shapes = {tuple(m.codes.shape) for m in reloaded.modules() if isinstance(m, QuantizedLinear)}
    tensors = dict(reloaded.named_parameters()) | dict(reloaded.named_buffers())
    floats = {name: tuple(t.shape) for name, t in tensors.items() if t.is_floating_point()}
    assert not [name for name, shape in floats.items() if shape in shapes or shape[::-1] in shapes]
    assert not any(t.is_meta for t in tensors.values())


def test_a_loaded_int4_model_keeps_no_mapping_of_its_packed_file(tmp_path):
    """The int4 codes are unpacked at load: the checkpoint's packed bytes must not stay resident beside them."""
    model = tied_lm()
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    quantized = mambaquant.quantize(model, method="rtn", w_bits=4, a_bits=16, calib=calib, calib_samples=4,
                                    weight_rounding="rtn")
    directory = mambaquant.save(quantized, tmp_path / "q")
    reloaded = mambaquant.load(directory)
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(directory) in line]
    assert not mapped
    assert torch.equal(reloaded(calib[:1]), quantized(calib[:1]))
