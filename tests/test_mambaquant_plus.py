"""What mambaquant+ adds to the paper's recipe, each part on its own: searched clipping (weights per output channel,
activations per site) never raises the error it minimises and lowers it on heavy tails; GPTQ in activation order is
GPTQ on the permuted columns; the options keep the function at 16 bits; clipping and mixed precision by site
round-trip through save / load and run the same on the int8 backend; the checkpoint verifier holds each site to its
bits; the report says per site what was chosen and why; bad options are refused in one line."""

import json

import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.methods import PRESETS, QuantConfig, set_backend
from mambaquant.quant.clipping import SiteSample, activation_clip, weight_clip
from mambaquant.quant.gptq import gptq_quantize
from mambaquant.quant.quantizer import ActivationQuantizer, QuantSpec, dequantize_weight, quantize_weight
from mambaquant.runtime import LMConfig, Mamba2LMConfig, MambaLM, VisionConfig, VisionMamba, init_weights

from .cli_cases import assert_refused
from .helpers import rel_err


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def heavy_tailed(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) / torch.rand(shape, generator=g).clamp(min=0.05)  # a Student-t-like tail


def models():
    lm = init_weights(MambaLM(LMConfig(d_model=32, n_layer=2, d_state=8, vocab_size=64)), seed=1).eval()
    lm2 = init_weights(MambaLM(Mamba2LMConfig(d_model=32, n_layer=2, d_state=8, head_dim=8, n_groups=2,
                                              vocab_size=64)), seed=2).eval()
    vim = init_weights(VisionMamba(VisionConfig(d_model=16, n_layer=2, d_state=4, img_size=16, patch_size=8,
                                                stride=8, num_classes=3)), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    return {"mamba1": (lm, torch.randint(0, 64, (4, 24), generator=g), torch.randint(0, 64, (2, 24), generator=g)),
            "mamba2": (lm2, torch.randint(0, 64, (4, 24), generator=g), torch.randint(0, 64, (2, 24), generator=g)),
            "vim": (vim, torch.randn(4, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g))}


def test_presets_hold_w4a4_and_w6a6():
    assert PRESETS["w4a4"] == (4, 4) and PRESETS["w6a6"] == (6, 6)
    config = QuantConfig.preset("W4A4", method="mambaquant+")
    assert (config.w_bits, config.a_bits, config.clip_search, config.act_order) == (4, 4, True, False)
    paper = QuantConfig.preset("w4a4")  # the paper's recipe stays as it is
    assert (paper.clip_search, paper.act_order, paper.site_bits) == (False, False, {})


@pytest.mark.parametrize("granularity,dynamic", [("tensor", False), ("token", True)])
def test_activation_clipping_lowers_the_squared_error_on_heavy_tails(granularity, dynamic):
    quantizer = ActivationQuantizer(QuantSpec(4, granularity=granularity, dynamic=dynamic))
    sample = SiteSample(per_position=False)
    for seed in range(3):
        x = heavy_tailed((2, 16, 32), seed)
        if not dynamic:
            quantizer.observe(None, x)
        sample(None, x)
    ratio, error, unclipped = activation_clip(quantizer, sample)
    assert ratio < 1 and error < unclipped
    clipped = ActivationQuantizer(QuantSpec(4, granularity=granularity, dynamic=dynamic, clip=ratio))
    clipped.low, clipped.high, clipped.batches = quantizer.low, quantizer.high, quantizer.batches
    fresh = heavy_tailed((2, 16, 32), 99)  # the ratio carries over to data the search did not see
    assert ((clipped(fresh) - fresh) ** 2).sum() < ((quantizer(fresh) - fresh) ** 2).sum()


def test_activation_clipping_keeps_the_full_range_where_it_is_best():
    quantizer = ActivationQuantizer(QuantSpec(8))
    x = torch.linspace(-1, 1, 4096).reshape(1, 64, 64)  # uniform: every value in range is as likely
    quantizer.observe(None, x)
    sample = SiteSample(per_position=False)
    sample(None, x)
    assert activation_clip(quantizer, sample)[0] == 1.0


@pytest.mark.parametrize("group", [0, 16])
def test_weight_clipping_never_raises_the_output_error_per_channel(group):
    weight = heavy_tailed((24, 64), 1)
    inputs = heavy_tailed((256, 64), 2)
    second_moment = inputs.T @ inputs / len(inputs)
    spec = QuantSpec(4, granularity="group" if group else "channel", group_size=group or 128)
    clip = weight_clip(weight, second_moment, spec)
    assert clip.shape == quantize_weight(weight, spec)[1].shape and (clip <= 1).all() and (clip >= 0.5).all()

    def output_error(ratios):
        error = inputs @ (weight - dequantize_weight(*quantize_weight(weight, spec, ratios))).T
        return (error**2).sum(0)

    plain, clipped = output_error(None), output_error(clip)
    if not group:  # per channel the search minimises exactly this, channel by channel
        assert (clipped <= plain * (1 + 1e-5)).all()
    assert clipped.sum() < plain.sum() and (clip < 1).any()


def test_gptq_in_activation_order_is_gptq_on_the_permuted_columns():
    weight = heavy_tailed((16, 48), 3)
    scales = torch.linspace(0.1, 4, 48)[torch.randperm(48, generator=torch.Generator().manual_seed(4))]
    inputs = torch.randn(200, 48, generator=torch.Generator().manual_seed(5)) * scales
    second_moment = inputs.T @ inputs / len(inputs)
    spec = QuantSpec(4, granularity="channel")
    codes, scale = gptq_quantize(weight, second_moment, spec, act_order=True)
    order = torch.argsort(torch.diag(second_moment), descending=True, stable=True)
    permuted_codes, permuted_scale = gptq_quantize(weight[:, order], second_moment[order][:, order], spec)
    assert torch.equal(codes[:, order], permuted_codes) and torch.equal(scale, permuted_scale)
    assert not torch.equal(codes, gptq_quantize(weight, second_moment, spec)[0])  # the order mattered here
    with pytest.raises(InputError, match="per-channel"):
        gptq_quantize(weight, second_moment, QuantSpec(4, granularity="group", group_size=16), act_order=True)


def test_group_scales_take_searched_clipping_through_gptq():
    model, calib, x = models()["mamba1"]
    quantized = mambaquant.quantize(model, method="mambaquant+", w_bits=4, a_bits=16, calib=calib,
                                    weight_group_size=2)
    plain = mambaquant.quantize(model, method="mambaquant+", w_bits=4, a_bits=16, calib=calib, weight_group_size=2,
                                clip_search=False)
    assert any("clipping searched" in line for line in quantized.quantization_report.weights)
    with torch.no_grad():
        assert not torch.equal(quantized(x), plain(x))


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "vim"])
def test_options_at_16_bits_keep_the_function(kind):
    """At 16 bits nothing is quantized: clipping and ordering have nothing to act on, and mambaquant+ is the
    paper's transforms, which keep the model's function."""
    model, calib, x = models()[kind]
    plus = mambaquant.quantize(model, method="mambaquant+", w_bits=16, a_bits=16, calib=calib)
    paper = mambaquant.quantize(model, method="mambaquant", w_bits=16, a_bits=16, calib=calib)
    with torch.no_grad():
        assert rel_err(plus(x), model(x)) < 1e-4
        assert torch.equal(plus(x), paper(x))


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "vim"])
def test_without_smoothing_the_rotations_alone_keep_the_function_and_no_smoothing_is_left(kind):
    """`smooth=False` (a part `decide` may drop): at 16 bits the model's function is kept; at W4A8 the model differs
    from the smoothed one, and none of the smoothing's scales is anywhere in it."""
    from mambaquant.transforms.smoothing import Scale

    model, calib, x = models()[kind]
    plain = mambaquant.quantize(model, method="mambaquant+", w_bits=16, a_bits=16, calib=calib, smooth=False)
    assert "smoothing off" in plain.quantization_report.transforms[0]
    with torch.no_grad():
        assert rel_err(plain(x), model(x)) < 1e-4
    unsmoothed = mambaquant.quantize(model, method="mambaquant", w_bits=4, a_bits=8, calib=calib, smooth=False)
    smoothed = mambaquant.quantize(model, method="mambaquant", w_bits=4, a_bits=8, calib=calib)
    assert not any(isinstance(m, Scale) for m in unsmoothed.modules())
    assert all(getattr(m, "gate_scale", None) is None for m in unsmoothed.modules())
    with torch.no_grad():
        assert not torch.equal(unsmoothed(x), smoothed(x))
    with pytest.raises(InputError, match="smoothquant without smoothing is rtn"):
        QuantConfig(method="smoothquant", smooth=False)


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "vim"])
def test_w4a4_clipping_and_mixed_precision_round_trip_and_run_on_int8(kind, tmp_path):
    model, calib, x = models()[kind]
    quantized = mambaquant.quantize(model, method="mambaquant+", w_bits=4, a_bits=4, calib=calib)
    config = quantized.quantization_report.config
    ssm_sites = ("B", "C", "h", "x", "xBC") if kind == "mamba2" else ("C", "h", "x")  # no linear layer reads them
    assert config["site_bits"] == {site: 8 for site in ssm_sites}
    sites = quantized.quantization_report.activation_sites
    assert all(d.startswith("int8") for name, d in sites.items() if name.endswith(".h"))
    assert any("clipped to" in d for d in sites.values())
    mambaquant.save(quantized, tmp_path / "q")
    reloaded = mambaquant.load(str(tmp_path / "q"))
    with torch.no_grad():
        expected = quantized(x)
        assert torch.equal(reloaded(x), expected)
        assert reloaded.quantization_report.activation_sites == sites
        set_backend(reloaded, "int8")
        assert torch.allclose(reloaded(x), expected, atol=1e-4, rtol=1e-4)  # float32 sums against int32 ones


def test_the_report_says_per_site_what_was_chosen_and_why():
    model, calib, _ = models()["mamba1"]
    report = mambaquant.quantize(model, method="mambaquant+", w_bits=4, a_bits=4, calib=calib,
                                 act_order=True).quantization_report
    assert set(report.clipping) == set(report.activation_sites)
    assert all("clipped to" in why or "not clipped" in why for why in report.clipping.values())
    assert all("squared error" in why for why in report.granularity_reasons.values())  # tensor against token
    h = next(name for name in report.granularity_reasons if name.endswith("ssm.h"))
    assert "int8 here, int4 elsewhere" in report.granularity_reasons[h]
    summary = report.summary()
    assert "GPTQ in activation order" in summary and "clipping searched per output channel" in summary


def test_checkpoint_holds_each_site_to_its_bits(tmp_path):
    model, calib, x = models()["mamba1"]
    mambaquant.save(mambaquant.quantize(model, method="mambaquant+", w_bits=4, a_bits=4, calib=calib), tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["site_bits"] = {"h": 8}  # the conv input x was quantized at 8 bits
    path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="8 bits, but quantization_config.a_bits is 4"):
        mambaquant.load(str(tmp_path / "q"))


def test_checkpoint_holds_a_linear_input_to_its_site_bits(tmp_path):
    model, calib, x = models()["mamba1"]
    quantized = mambaquant.quantize(model, method="mambaquant+", w_bits=4, a_bits=4, calib=calib,
                                    site_bits={"out_proj_in": 8})
    mambaquant.save(quantized, tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["site_bits"] = {}
    path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="out_proj.*8 bits, but quantization_config.a_bits is 4"):
        mambaquant.load(str(tmp_path / "q"))


def test_a_checkpoint_from_before_the_options_loads(tmp_path):
    """Written before clipping and site bits existed: no clip in its specs, none of the three options."""
    model, calib, x = models()["mamba1"]
    quantized = mambaquant.quantize(model, method="quarot", w_bits=8, a_bits=8, calib=calib)
    mambaquant.save(quantized, tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    q = config["quantization_config"]
    for name in ("clip_search", "act_order", "site_bits"):
        del q[name]
    for entry in q["layout"]["linears"].values():
        if entry.get("input"):
            del entry["input"]["clip"]
    for ops in q["layout"]["sites"].values():
        for op in ops:
            op.get("spec", {}).pop("clip", None)
    path.write_text(json.dumps(config))
    with torch.no_grad():
        assert torch.equal(mambaquant.load(str(tmp_path / "q"))(x), quantized(x))


@pytest.mark.parametrize("options,words", [
    ({"site_bits": {"nope": 8}}, "unknown site kind 'nope'"),
    ({"site_bits": {"h": 9}}, "from 2 to 8"),
    ({"site_bits": {"h": 8}, "a_bits": 16}, "a_bits is 16"),
    ({"site_bits": [8]}, "maps site kinds"),
    ({"act_order": True, "method": "rtn"}, "act_order orders GPTQ"),
    ({"act_order": True, "weight_group_size": 32}, "per-channel weight scales"),
    ({"clip_search": "yes"}, "clip_search must be true or false"),
])
def test_bad_options_are_refused(options, words):
    with pytest.raises(InputError, match=words):
        QuantConfig(**{"method": "mambaquant+", "w_bits": 4, "a_bits": 4, **options})


def test_cli_refuses_bad_site_bits(cli):
    assert_refused(cli.run("quantize", "mamba-shakespeare", "--site-bits", "h8", "--no-eval"), "--site-bits",
                   "SITE=BITS")
    assert_refused(cli.run("quantize", "mamba-shakespeare", "--site-bits", "qq=8", "--no-eval"), "unknown site kind")


def test_the_per_site_report_is_saved_and_printed(cli, tmp_path):
    model, calib, _ = models()["mamba1"]
    quantized = mambaquant.quantize(model, method="mambaquant+", w_bits=4, a_bits=4, calib=calib)
    out = mambaquant.save(quantized, tmp_path / "q")
    reloaded = mambaquant.load(str(out)).quantization_report
    assert reloaded == quantized.quantization_report
    card = (out / "MODEL_CARD.md").read_text()
    assert all(line in card for line in reloaded.site_lines()) and "clipping searched per output channel" in card
    result = cli.run("quantize", "mamba-shakespeare", "--method", "mambaquant+", "--w-bits", "4", "--a-bits", "4",
                     "--calib-samples", "2", "--calib-len", "64", "--no-eval", "--explain")
    assert result.code == 0, result.stderr
    assert "layers.3.mixer.ssm.h: int8 symmetric" in result.stdout and "int8 here, int4 elsewhere" in result.stdout


def test_site_bits_for_a_site_the_model_does_not_quantize_are_refused():
    model, calib, _ = models()["mamba1"]
    with pytest.raises(InputError, match="quantizes no activation site of kind 'xBC'"):
        mambaquant.quantize(model, method="mambaquant+", w_bits=4, a_bits=4, calib=calib, site_bits={"xBC": 8})


def test_site_bits_on_the_command_line():
    from mambaquant.cli import site_bits_value

    assert site_bits_value("h=8,x=6") == {"h": 8, "x": 6} and site_bits_value("none") == {}
    config = QuantConfig(method="mambaquant+", w_bits=4, a_bits=4, site_bits=site_bits_value("none"))
    assert config.site_bits == {}  # pure W4A4: the rule is not applied over an explicit empty assignment
