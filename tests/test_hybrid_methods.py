"""Every method on the hybrid models' layers (attention, MLP, experts, Falcon-H1's parallel mixer, Mamba-1 and
Mamba-2 layers), on random models of the published configurations (tests/test_hybrids.py): at 16 bits each keeps
the function; quantized, the int8 backend equals the simulation and save -> load is exact; scope "linear" quantizes
the linear layers' inputs only; every expert is calibrated."""

import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.methods import METHODS, set_backend
from mambaquant.methods.config import MAMBA2_ONLY_METHODS
from mambaquant.quant.linear import QuantizedLinear
from mambaquant.quant.quantizer import ActivationQuantizer
from mambaquant.runtime.moe import ExpertList

from .helpers import rel_err
from .test_hybrids import ARCHITECTURES, COMMON, ours_with_ids, reference

QUANTIZABLE = list(ARCHITECTURES)
MAMBA1_HYBRIDS = ("jamba",)


@pytest.fixture(scope="module")
def hybrids():
    """Our model of each architecture, calibration token ids and fresh evaluation ids."""
    return ours_with_ids(QUANTIZABLE)


def methods_of(name: str) -> list[str]:
    return [m for m in METHODS if m != "fp" and not (name in MAMBA1_HYBRIDS and m in MAMBA2_ONLY_METHODS)]


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_every_method_keeps_the_function_at_16_bits(hybrids, name):
    models, calib, ids = hybrids
    model = models[name]
    want = logits(model, ids)
    for method in methods_of(name):
        transformed = mambaquant.quantize(model, method=method, w_bits=16, a_bits=16, calib=calib)
        assert rel_err(logits(transformed, ids), want) < 1e-4, method
    assert torch.equal(logits(model, ids), want)  # the source model is left as it was


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantized_hybrids_save_load_exactly_and_run_on_int8(hybrids, name, tmp_path):
    """W8A8 per token for every method (every linear then reads int8 inputs), and W4A4 for mambaquant+."""
    models, calib, ids = hybrids
    runs = [(method, 8, 8, "token") for method in methods_of(name)] + [("mambaquant+", 4, 4, "auto")]
    for method, w_bits, a_bits, granularity in runs:
        quantized = mambaquant.quantize(models[name], method=method, w_bits=w_bits, a_bits=a_bits, calib=calib,
                                        act_granularity=granularity)
        simulated = logits(quantized, ids)
        bound = 0.5 if a_bits == 8 else 0.75  # a random model of width 64: W4A4 costs every method ~0.3-0.6 here
        assert torch.isfinite(simulated).all() and rel_err(simulated, logits(models[name], ids)) < bound, method
        linears = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
        assert linears and all(linear.input_quantizer is not None for linear in linears), method
        back = mambaquant.load(mambaquant.save(quantized, tmp_path / f"{method}{w_bits}{a_bits}"))
        assert torch.equal(logits(back, ids), simulated), method
        assert back.quantization_report == quantized.quantization_report
        assert rel_err(logits(set_backend(back, "int8"), ids), simulated) < 1e-5, method


def quantized_site_kinds(model) -> set[str]:
    kinds = {site.rpartition(".")[2] for site in model.quantization_report.activation_sites}
    return kinds


def test_scope_linear_quantizes_the_linear_inputs_only(hybrids):
    models, calib, ids = hybrids
    model = models["granite-4.0-h moe"]
    every = mambaquant.quantize(model, method="rtn", calib=calib, act_granularity="tensor")
    linear = mambaquant.quantize(model, method="rtn", calib=calib, act_granularity="tensor", scope="linear")
    assert {"xBC", "x", "B", "C", "h"} <= quantized_site_kinds(every)
    assert quantized_site_kinds(linear) == {"norm", "out_proj_in", "o_proj_in", "mlp_in", "down_in", "norm_f"}
    assert quantized_site_kinds(linear) < quantized_site_kinds(every)
    # the same weights: the scope changes which activations are quantized, nothing else
    codes = [(m.codes, m.scale) for m in linear.modules() if isinstance(m, QuantizedLinear)]
    assert all(torch.equal(a[0], b.codes) and torch.equal(a[1], b.scale)
               for a, b in zip(codes, [m for m in every.modules() if isinstance(m, QuantizedLinear)]))
    assert rel_err(logits(linear, ids), logits(model, ids)) < rel_err(logits(every, ids), logits(model, ids))
    with pytest.raises(InputError, match="unknown scope 'ssm'"):
        mambaquant.quantize(model, method="rtn", calib=calib, scope="ssm")


def test_every_expert_is_calibrated_and_the_routing_reported(hybrids):
    """Every expert gets its Hessian and ranges from every calibration token (GPTQ's needs them: an expert no
    token reached would have none); each token's output is still its own experts'."""
    models, calib, ids = hybrids
    model = models["nemotron-h moe"]
    quantized = mambaquant.quantize(model, method="gptq", w_bits=4, a_bits=8, calib=calib[:1, :6],
                                    act_granularity="tensor")
    lists = [m for m in quantized.modules() if isinstance(m, ExpertList)]
    assert len(lists) == 2 and not any(experts.route_all for experts in lists)
    for experts in lists:
        for expert in experts:
            assert isinstance(expert.up_proj, QuantizedLinear) and expert.up_proj.input_quantizer.high.abs().sum() > 0
    lines = [line for line in quantized.quantization_report.weights if "every expert calibrated" in line]
    assert len(lines) == 2 and all("on all 6 calibration tokens" in line for line in lines)
    assert any("no token reached expert" in line for line in lines)  # 6 tokens x 2 of 8 experts leave some out
    transformed = mambaquant.quantize(model, method="rtn", w_bits=16, a_bits=16, calib=calib)
    experts = next(m for m in transformed.modules() if isinstance(m, ExpertList))
    want = logits(transformed, ids)
    experts.route_all = True  # every expert runs every token: the outputs are the routed ones all the same
    assert rel_err(logits(transformed, ids), want) < 1e-6


def test_methods_that_cannot_act_on_a_layer_kind_say_so(hybrids):
    models, calib, _ = hybrids
    with pytest.raises(InputError, match="method quamba2 quantizes Mamba-2 blocks"):
        mambaquant.quantize(models["jamba"], method="quamba2", calib=calib)


def test_the_report_says_what_each_layer_kind_got(hybrids):
    models, calib, _ = hybrids
    report = mambaquant.quantize(models["bamba"], method="mambaquant", calib=calib).quantization_report
    transforms = report.transforms[0]
    for words in ("mamba2: smooth-fused rotation at out_proj", "attention: smooth-fused rotation at o_proj",
                  "mlp: smooth-fused rotation at down_proj"):
        assert words in transforms
    assert any("q_proj, k_proj, v_proj, o_proj" in line for line in report.weights)
    quantizers = [m for m in mambaquant.quantize(models["bamba"], method="rtn", calib=calib).modules()
                  if isinstance(m, ActivationQuantizer)]
    assert len(quantizers) == len({id(q) for q in quantizers})  # q, k and v each hold their own input quantizer


@pytest.mark.parametrize("name", ["granite-4.0-h moe", "nemotron-h moe", "jamba", "falcon-h1 norm before gate",
                                  "zamba2 two blocks"])
def test_streamed_quantization_of_a_hybrid_is_bit_identical_to_in_memory(name, tmp_path):
    """From the model's own layout (save_pretrained: fused, per-expert and multiplied tensors mapped block by block;
    Zamba2's shared blocks read from the layer holding them for every layer using them) and from ours; MambaQuant's
    model-wide statistics pass replays its edits on every block read."""
    generator = torch.Generator().manual_seed(4)
    calib = torch.randint(0, COMMON["vocab_size"], (2, 16), generator=generator)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 13), generator=generator)
    reference(name).save_pretrained(tmp_path / "hf")
    mambaquant.save(mambaquant.load(str(tmp_path / "hf")), tmp_path / "ours")
    in_memory = logits(mambaquant.quantize(str(tmp_path / "hf"), method="mambaquant", calib=calib, stream=False), ids)
    for layout in ("hf", "ours"):
        out = mambaquant.quantize(str(tmp_path / layout), method="mambaquant", calib=calib,
                                  out=tmp_path / f"q-{layout}", stream=True)
        assert torch.equal(logits(mambaquant.load(str(out)), ids), in_memory), layout


def test_zamba2_shared_blocks_are_unshared_and_the_report_says_so(hybrids):
    """Every hybrid layer gets its own copy of the attention and MLP weights it shared (a rounding chosen at one
    depth would be wrong at the others): the quantized model's config says one set per hybrid layer, the source
    model keeps its sharing, and the report counts the parameters added."""
    models, calib, ids = hybrids
    model = models["zamba2 two blocks"]
    q_proj = [layer.shared.attention.q_proj for layer in model.layers if hasattr(layer, "shared")]
    assert len(q_proj) == 3 and q_proj[0] is q_proj[2] and q_proj[0] is not q_proj[1]
    quantized = mambaquant.quantize(model, method="gptq", w_bits=4, a_bits=16, calib=calib)
    codes = [layer.shared.attention.q_proj for layer in quantized.layers if hasattr(layer, "shared")]
    assert all(isinstance(linear, QuantizedLinear) for linear in codes) and len({id(c) for c in codes}) == 3
    assert not torch.equal(codes[0].codes, codes[2].codes)  # the same weights, rounded for different inputs
    assert quantized.config.shared_blocks == 3 and model.config.shared_blocks == 2
    shared = sum(p.numel() for name, p in model.layers[1].shared.named_parameters() if "adapter" not in name)
    line = next(line for line in quantized.quantization_report.weights if "unshared" in line)
    assert f"+{shared:,} parameters" in line
    assert rel_err(logits(quantized, ids), logits(model, ids)) < 0.5


def test_compare_runs_both_scopes_on_a_hybrid_and_says_what_each_keeps_in_float():
    from mambaquant.compare import compare, format_table

    rows = compare("hybrid-shakespeare", methods=("fp", "rtn"), bits=("w8a8", "w4a16"), granularities=("token",),
                   eval_samples=2, calib_samples=2, calib_len=64)
    assert [(r.method, r.bits, r.scope) for r in rows] == [("fp", "fp32", "all"), ("rtn", "w8a8", "all"),
                                                          ("rtn", "w8a8", "linear"), ("rtn", "w4a16", "all")]
    table = format_table(rows)
    assert "scope linear: the linear layers' inputs only" in table and " linear " in table
    only_all = compare("hybrid-shakespeare", methods=("rtn",), bits=("w8a8",), granularities=("token",),
                       eval_samples=2, calib_samples=2, calib_len=64, scopes="all")
    assert [r.scope for r in only_all] == ["all"] and "scope" not in format_table(only_all).splitlines()[2]
