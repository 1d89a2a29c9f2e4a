"""The int8 backend's kernels: `torch._int_mm` exact at the extreme codes, W8A8 / W4A8 bit-identical to the float
simulation (per channel and per group, static and dynamic input scales), weight-only linears within float32
precision of the dequantized product with no float copy of the weights, and a tied embedding that reads the
quantized head's codes (in memory and after reloading)."""

import itertools
from pathlib import Path

import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.methods import set_backend
from mambaquant.quant import linear as linear_module
from mambaquant.quant.linear import QuantizedEmbedding, QuantizedLinear, int8_product, limb_codes
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


def test_a_kernel_wrong_only_at_a_degenerate_shape_is_refused(monkeypatch):
    """torch 2.13's oneDNN int8 product gets (M, 1) @ (1, N) wrong in some layouts: the start-up check must try the
    degenerate shapes the backend runs, not only wide ones."""
    int_mm = torch._int_mm
    monkeypatch.setattr(linear_module, "INT8_KERNELS_CHECKED", None)
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: int_mm(a, b) + (a.shape[1] == 1))
    with pytest.raises(InputError, match="int8 matrix product.*--backend fake"):
        quantized_linear(8, 0, QuantSpec(8)).set_backend("int8")


def test_int8_product_is_exact_in_every_layout_of_its_operands():
    """A single row or a width-1 weight in any valid layout: the strides of a size-1 dimension are arbitrary, and
    oneDNN reads them (q (1, K) with strides (1, 1) and codes.t() (1, N) with strides (1, 1) give wrong sums)."""
    generator = torch.Generator().manual_seed(0)
    for rows, width, out_features in itertools.product((1, 3), (1, 2, 17), (1, 2, 33)):
        q = torch.randint(-127, 128, (rows, width + 2), generator=generator, dtype=torch.int8)
        codes = torch.randint(-127, 128, (out_features, width + 2), generator=generator, dtype=torch.int8)
        q_layouts = [q[:, :width].contiguous(), q[:, 1:width + 1], q[:, :width].t().contiguous().t(),
                     torch.empty_strided((rows, width), (1, 1), dtype=torch.int8).copy_(q[:, :width])]
        codes_layouts = [codes[:, :width].contiguous(), codes[:, 2:], codes[:, :width].t().contiguous().t()]
        for a, b in itertools.product(q_layouts[:3] if rows > 1 else q_layouts, codes_layouts):
            assert torch.equal(int8_product(a, b).long(), a.long() @ b.long().t()), (a.stride(), b.stride())


WIDTHS = (1, 2, 3, 7, 16, 33)
GROUPS = {1: 1, 2: 2, 3: 3, 7: 7, 16: 4, 33: 3}  # per-group weight scales: groups of width 1, 4 and 11
SWEEP_INPUTS = INPUTS | {"weight-only": None}


def extreme_or_random_linear(out_features, in_features, bits, per_group, extreme, input_spec, generator):
    top = 2 ** (bits - 1) - 1
    if extreme:
        codes = torch.where(torch.rand(out_features, in_features, generator=generator) < 0.5, -top, top)
    else:
        codes = torch.randint(-top, top + 1, (out_features, in_features), generator=generator)
    groups = GROUPS[in_features] if per_group else 0
    scale_shape = (out_features, groups, 1) if per_group else (out_features, 1)
    scale = torch.rand(scale_shape, generator=generator) * 0.1 + 1e-3
    quantizer = None
    if input_spec is not None:
        quantizer = ActivationQuantizer(input_spec)
        quantizer.observe(None, 2 * torch.randn(4, in_features, generator=generator))
    return QuantizedLinear(codes, scale, torch.randn(out_features, generator=generator), bits, quantizer)


@pytest.mark.parametrize("input_spec", SWEEP_INPUTS.values(), ids=SWEEP_INPUTS.keys())
@pytest.mark.parametrize("bits,per_group", [(8, False), (4, False), (8, True), (4, True)])
def test_every_width_down_to_one_matches_the_simulation(bits, per_group, input_spec):
    """in_features and out_features down to 1 (dt_proj at dt_rank 1 is 1 -> d_inner), single and several rows,
    extreme and random codes: bit for bit where the input is quantized, within float32 precision otherwise."""
    generator = torch.Generator().manual_seed(bits + per_group)
    for in_features in WIDTHS:
        for out_features in WIDTHS:
            for extreme in (True, False):
                layer = extreme_or_random_linear(out_features, in_features, bits, per_group, extreme, input_spec,
                                                 generator)
                for rows in (1, 5):
                    x = 3 * torch.randn(rows, in_features, generator=generator)
                    x[0] = 1e3 * torch.where(torch.rand(in_features, generator=generator) < 0.5, -1.0, 1.0)
                    layer.set_backend("fake")
                    simulated = layer(x)
                    layer.set_backend("int8")
                    integer = layer(x)
                    case = f"{rows} x {in_features} -> {out_features}, {'extreme' if extreme else 'random'} codes"
                    assert torch.isfinite(integer).all(), case
                    if input_spec is not None:
                        assert torch.equal(integer, simulated), case
                    else:  # the limbs' 2^-23 of max|x| sum|w| (as in the test above), plus float32's rounding of
                        # the few operations that scale and add up the limbs' sums and the bias, at these large outputs
                        weight = layer.dequantized_weight().double()
                        reference = x.double() @ weight.T + layer.bias.double()
                        magnitude = x.abs().amax(1, keepdim=True).double() * weight.abs().sum(1) + layer.bias.abs()
                        bound = magnitude * 2**-21
                        assert ((simulated - reference).abs() <= bound).all(), case
                        assert ((integer - reference).abs() <= bound).all(), case


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 4)])
def test_a_model_with_dt_rank_1_runs_exactly_on_the_int8_backend(w_bits, a_bits):
    """dt_proj takes a width-1 input: every quantized linear, and so the logits, must equal the simulation's. The
    weights are drawn larger than usual (std 0.3) so that a wrong dt_proj reaches the logits."""
    config = LMConfig(d_model=16, n_layer=2, d_state=4, dt_rank=1, vocab_size=256)
    model = init_weights(MambaLM(config), std=0.3, seed=0).eval()
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    quantized = mambaquant.quantize(model, method="rtn", w_bits=w_bits, a_bits=a_bits, calib=calib, calib_samples=4)
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            module.register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, []).append(o.clone()))
    simulated = quantized(ids)
    integer = set_backend(quantized, "int8")(ids)
    assert quantized.layers[0].mixer.ssm.dt_proj.in_features == 1
    assert {name: torch.equal(*pair) for name, pair in outputs.items()} == {name: True for name in outputs}
    assert torch.isfinite(integer).all() and torch.equal(integer, simulated)


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
