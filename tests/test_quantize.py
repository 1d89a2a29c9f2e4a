import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.methods import QuantConfig, activation_sites, run_recipe
from mambaquant.runtime import LMConfig, MambaLM, MambaTagger, TaggerConfig, init_weights

from .helpers import MAMBA1_METHODS, rel_err


def lm_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, 48), generator=g) for _ in range(2)]


def vim_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]


@pytest.mark.parametrize("method", MAMBA1_METHODS)
@pytest.mark.parametrize("bits,granularity", [("w8a8", "tensor"), ("w4a8", "token"), ("w4a16", "tensor"), ("w8a8", "auto")])
def test_every_method_runs_and_stays_close(small_lm, small_vim, method, bits, granularity):
    for model, batches in ((small_lm, lm_batches()), (small_vim, vim_batches())):
        config = QuantConfig.preset(bits, method=method, act_granularity=granularity)
        quantized, report = run_recipe(model, config, batches)
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
    config = QuantConfig.preset("w4a8", method="mambaquant", act_granularity="auto", seed=3)
    a, _ = run_recipe(small_lm, config, lm_batches())
    b, _ = run_recipe(small_lm, config, lm_batches())
    x = lm_batches(seed=5)[0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert all(torch.equal(before[k], v) for k, v in small_lm.state_dict().items())


def test_bad_configs():
    with pytest.raises(InputError, match="expected one of fp, rtn"):
        QuantConfig(method="awq")
    with pytest.raises(InputError, match="bit width"):
        QuantConfig(w_bits=9)
    with pytest.raises(InputError, match="unknown bit widths"):
        QuantConfig.preset("w3a3x")


def test_empty_calibration_is_refused(small_lm):
    with pytest.raises(InputError, match="calibration set is empty"):
        run_recipe(small_lm, QuantConfig(), [])


@pytest.mark.parametrize("method", MAMBA1_METHODS)
def test_transforms_alone_keep_the_function(method, small_vim):
    """16 bits quantize nothing: what is left are the method's transforms, which must keep the model's function
    (here on a tied-head language model, where scaling the head must not scale the embedding, and on a Vim)."""
    tied = init_weights(MambaLM(LMConfig(d_model=64, n_layer=2, d_state=8, vocab_size=256)), seed=4).eval()
    tagger = init_weights(MambaTagger(TaggerConfig(d_model=32, n_layer=2, expand=1, bias=True, x_proj_bias=True,
                                                   conv="same", norm="layer", bidirectional="shared", divide_out=False,
                                                   vocab_size=256, num_classes=5)), seed=5).eval()
    with torch.no_grad():  # a LayerNorm model with non-trivial scales and biases, like typeseg
        for name, p in tagger.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape))
    cases = [(tied, lm_batches(), torch.randint(0, 256, (2, 30))), (small_vim, vim_batches(), vim_batches(7)[0]),
             (tagger, lm_batches(), torch.randint(0, 256, (2, 30)))]
    for model, batches, x in cases:
        transformed = mambaquant.quantize(model, method=method, w_bits=16, a_bits=16, calib=torch.cat(batches))
        with torch.no_grad():
            assert rel_err(transformed(x), model(x)) < 1e-4


def test_mambaquant_beats_rtn_and_quarot_on_planted_outliers():
    """Channel outliers planted at the out_proj input (large D on a few channels) and at the in_proj input (large
    norm scales): W8A8 with static per-tensor activations everywhere, output error against the FP model."""
    model = init_weights(MambaLM(LMConfig(d_model=96, n_layer=3, d_state=16, vocab_size=256)), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers:
            channels = torch.randperm(layer.mixer.out_proj.in_features, generator=g)[:4]
            layer.mixer.ssm.D[channels] *= 60
            layer.mixer.out_proj.weight[:, channels] /= 60
            layer.norm.weight[torch.randperm(96, generator=g)[:3]] *= 20
    calib = torch.randint(0, 256, (16, 64), generator=g)
    x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(5))
    errors = {}
    for method in ("rtn", "quarot", "mambaquant"):
        quantized = mambaquant.quantize(model, method=method, w_bits=8, a_bits=8, act_granularity="tensor", calib=calib)
        with torch.no_grad():
            errors[method] = rel_err(quantized(x), model(x))
    assert errors["mambaquant"] < 0.5 * errors["quarot"] and errors["quarot"] < errors["rtn"], errors
