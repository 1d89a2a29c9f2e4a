"""The KV cache at its own bit width (`QuantConfig.kv_bits`, `--kv-bits`), on random models of the published hybrid
configurations (tests/test_hybrids.py): the per-(position, head) quantizer; QuaRot's and MambaQuant's Hadamard on
each query and key head keeps the function, with RoPE (online) and without (offline), with grouped queries and
partial rotary; kv_bits adds the k and v quantizers and changes nothing else; decoding with the quantized cache
equals the full-sequence forward; save -> load is exact and the int8 backend equals the simulation; the refusals."""

import copy
import json

import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.methods import set_backend
from mambaquant.methods.config import KV_METHODS, QuantConfig
from mambaquant.quant.linear import QuantizedLinear
from mambaquant.quant.quantizer import ActivationQuantizer, QuantSpec
from mambaquant.runtime import Site
from mambaquant.runtime.attention import Attention
from mambaquant.transforms.rotation import Rotate, rotate_queries_keys

from .cli_cases import assert_refused
from .helpers import rel_err
from .test_hybrids import decoded, ours_with_ids

# what each configuration's attention covers: head_dim 16 unless said
CONFIGS = {"granite-4.0-h dense": "no RoPE, 4 query heads on 2 key/value heads",
           "granite-4.0-h moe": "RoPE on the whole head",
           "bamba": "RoPE on half of each head",
           "falcon-h1 norm before gate": "RoPE, head_dim 24 (12 x 2), a key multiplier",
           "jamba": "no RoPE, among Mamba-1 layers",
           "zamba2 one block": "no RoPE, one shared block (unshared when quantized)",
           "zamba2 two blocks": "RoPE, low-rank adapters beside q, k and v"}
ROTATING = ("quarot", "mambaquant", "mambaquant+")


@pytest.fixture(scope="module")
def hybrids():
    return ours_with_ids(CONFIGS)


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def attentions(model) -> list[Attention]:
    return [module for module in model.modules() if isinstance(module, Attention)]


def site_ops(site: Site) -> list:
    return [] if site.op is None else list(site.op) if isinstance(site.op, torch.nn.Sequential) else [site.op]


def kv_quantizers_removed(model):
    """The model with its KV cache back in float: every quantizer at a `k` or `v` site taken off."""
    for attention in attentions(model):
        for kind in ("k", "v"):
            site = attention.sites[kind]
            kept = [op for op in site_ops(site) if not isinstance(op, ActivationQuantizer)]
            site.op = None if not kept else kept[0] if len(kept) == 1 else torch.nn.Sequential(*kept)
    return model


def test_the_kv_quantizer_has_one_range_per_position_and_head():
    quantizer = ActivationQuantizer(QuantConfig(method="rtn", kv_bits=4).kv_cache_spec(8))
    x = torch.randn(2, 5, 3 * 8)
    x[..., :8] *= 1000  # one loud head: per token it would take every head's range
    error = (quantizer(x) - x).unflatten(-1, (3, 8)).abs().amax((0, 1, 3))
    steps = x.unflatten(-1, (3, 8)).amax(-1) - x.unflatten(-1, (3, 8)).amin(-1)  # per position and head
    assert (error <= steps.amax((0, 1)) / 15 / 2 * 1.0001).all()  # within half a step of its own head's range
    assert error[1:].max() < 1  # the quiet heads keep their own scale
    assert quantizer.per_token and not quantizer.spec.symmetric
    assert "int4 asymmetric, dynamic per group of 8 values" in quantizer.extra_repr()
    decoded_steps = torch.cat([quantizer(x[:, t : t + 1]) for t in range(5)], dim=1)
    assert torch.equal(decoded_steps, quantizer(x))  # a cache filled one position at a time holds the same
    with pytest.raises(InputError, match="per-group activation scales are dynamic"):
        ActivationQuantizer(QuantSpec(4, granularity="group", group_size=8))


@pytest.mark.parametrize("name", CONFIGS)
def test_the_query_key_hadamard_keeps_the_function(hybrids, name):
    """Online after RoPE (q and k sites), offline in q_proj / k_proj rows without: the logits within 1e-4 of the
    float model's, prefill and decode alike."""
    models, calib, ids = hybrids
    model = models[name]
    want = logits(model, ids)
    rotated = copy.deepcopy(model)
    for attention in attentions(rotated):
        rotate_queries_keys(attention, seed=6)
    changed = []
    for before, after in zip(attentions(model), attentions(rotated)):
        online = [op for kind in ("q", "k") for op in site_ops(after.sites[kind]) if isinstance(op, Rotate)]
        assert len(online) == (2 if before.config.rope else 0), CONFIGS[name]
        changed.append(not torch.equal(before.k_proj.weight, after.k_proj.weight))
        assert torch.equal(before.v_proj.weight, after.v_proj.weight)
    assert changed == [not a.config.rope for a in attentions(model)]
    assert (logits(rotated, ids) - want).abs().max() < 1e-4
    assert (decoded(rotated, ids, 11) - want).abs().max() < 1e-4
    for method in ROTATING:  # the recipes' own transforms, their KV quantizers taken off again
        transformed = mambaquant.quantize(model, method=method, w_bits=16, a_bits=16, kv_bits=4, calib=calib)
        assert (logits(kv_quantizers_removed(transformed), ids) - want).abs().max() < 1e-4, method


def quantizers_by_site(model) -> dict[str, ActivationQuantizer]:
    found = {}
    for module in model.modules():
        if isinstance(module, Site):
            found.update({module.name: op for op in site_ops(module) if isinstance(op, ActivationQuantizer)})
        elif isinstance(module, QuantizedLinear) and module.input_quantizer is not None:
            found[f"{id(module)}"] = module.input_quantizer
    return found


def linear_codes(model) -> dict[str, torch.Tensor]:
    return {name: module.codes for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


@pytest.mark.parametrize("method, name", [("rtn", "bamba"), ("quarot", "granite-4.0-h moe"), ("quarot", "jamba")])
def test_kv_bits_adds_the_kv_quantizers_and_changes_nothing_else(hybrids, method, name):
    models, calib, _ = hybrids
    options = dict(method=method, w_bits=8, a_bits=8, calib=calib, act_granularity="tensor", weight_rounding="rtn")
    plain = mambaquant.quantize(models[name], **options)
    kv = mambaquant.quantize(models[name], kv_bits=4, **options)
    sites = plain.quantization_report.activation_sites
    kv_sites = kv.quantization_report.activation_sites
    cache = {site: kv_sites[site] for site in kv_sites if site.rpartition(".")[2] in ("k", "v")}
    assert len(cache) == 2 * len(attentions(kv)) and set(cache.values()) == {
        "int4 asymmetric, dynamic per group of 16 values"}
    assert {site: kv_sites[site] for site in kv_sites if site not in cache} == sites
    rope = attentions(kv)[0].config.rope
    turned = () if method == "rtn" or rope else ("q_proj", "k_proj")  # without RoPE the Hadamard is in their rows
    for (layer, codes), other in zip(linear_codes(plain).items(), linear_codes(kv).values()):
        assert torch.equal(codes, other) != layer.endswith(turned), layer
    ranges = {site: q for site, q in quantizers_by_site(kv).items() if not site.endswith((".k", ".v"))}
    for a, b in zip(quantizers_by_site(plain).values(), ranges.values()):
        assert a.spec == b.spec and torch.allclose(a.low, b.low, rtol=1e-5, atol=1e-6) and \
            torch.allclose(a.high, b.high, rtol=1e-5, atol=1e-6)
    assert len(ranges) == len(quantizers_by_site(plain))


@pytest.mark.parametrize("name", ["granite-4.0-h moe", "jamba"])
def test_decoding_with_the_quantized_cache_equals_the_full_forward(hybrids, name):
    """The cache holds each position's keys and values quantized per position and head, so prefilling some and
    decoding the rest one by one sees what the full sequence sees (W4A16: the other activations in float)."""
    models, calib, ids = hybrids
    for method in ("rtn", "quarot"):
        quantized = mambaquant.quantize(models[name], method=method, w_bits=4, a_bits=16, kv_bits=4, calib=calib)
        full = logits(quantized, ids)
        assert rel_err(full, logits(kv_quantizers_removed(copy.deepcopy(quantized)), ids)) > 1e-4  # kv4 acts
        assert rel_err(decoded(quantized, ids, 7), full) < 1e-5, method


@pytest.mark.parametrize("name", ["granite-4.0-h moe", "granite-4.0-h dense", "jamba"])
def test_kv_quantized_hybrids_save_load_exactly_and_run_on_int8(hybrids, name, tmp_path):
    models, calib, ids = hybrids
    runs = [("quarot", 8, 8, "token"), ("mambaquant", 8, 8, "token"), ("mambaquant+", 4, 16, None),
            ("rtn", 4, 4, "tensor")]
    for method, w_bits, a_bits, granularity in runs:
        quantized = mambaquant.quantize(models[name], method=method, w_bits=w_bits, a_bits=a_bits, kv_bits=4,
                                        calib=calib, act_granularity=granularity)
        simulated = logits(quantized, ids)
        back = mambaquant.load(mambaquant.save(quantized, tmp_path / method))
        assert torch.equal(logits(back, ids), simulated), method
        assert back.quantization_report == quantized.quantization_report
        assert "KV cache int4 per position and head" in back.quantization_report.summary()
        if granularity == "token":
            assert rel_err(logits(set_backend(back, "int8"), ids), simulated) < 1e-5, method


def test_a_checkpoint_whose_kv_cache_disagrees_with_its_config_is_refused(hybrids, tmp_path):
    models, calib, _ = hybrids
    quantized = mambaquant.quantize(models["bamba"], method="quarot", w_bits=4, a_bits=16, kv_bits=4, calib=calib)
    out = mambaquant.save(quantized, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    for kv_bits, words in ((16, "quantization_config.kv_bits is 16"), (8, "4 bits, but quantization_config.kv_bits "
                                                                           "is 8")):
        config["quantization_config"]["kv_bits"] = kv_bits
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(InputError, match=words):
            mambaquant.load(out)


def test_the_report_names_the_query_key_hadamard(hybrids):
    models, calib, _ = hybrids
    for method in ROTATING:
        report = mambaquant.quantize(models["bamba"], method=method, kv_bits=8, calib=calib).quantization_report
        assert "Hadamard per query and key head for the KV cache" in report.transforms[0], method
        cache = [reason for site, reason in report.granularity_reasons.items() if site.endswith((".k", ".v"))]
        assert len(cache) == 2 and all(reason.startswith("the KV cache at int8 (kv_bits)") for reason in cache)
    report = mambaquant.quantize(models["bamba"], method="quarot", calib=calib).quantization_report
    assert "query and key head" not in report.transforms[0]


REFUSED = {  # QuantConfig options -> words of the refusal
    "kv bits 12": (dict(method="quarot", kv_bits=12), "kv_bits must be an integer from 2 to 8, or 16"),
    "kv bits 1": (dict(method="quarot", kv_bits=1), "kv_bits must be an integer from 2 to 8, or 16"),
    "kv bits as text": (dict(method="quarot", kv_bits="4"), "kv_bits must be an integer"),
    "quamba": (dict(method="quamba", kv_bits=4), "method quamba acts on the Mamba layers only; the KV cache is "
                                                 "quantized by " + ", ".join(KV_METHODS)),
    "quamba2": (dict(method="quamba2", kv_bits=4), "method quamba2 acts on the Mamba layers only"),
    "fp": (dict(method="fp", kv_bits=4), "method fp quantizes nothing"),
    "scope linear": (dict(method="quarot", kv_bits=4, scope="linear"), "which scope linear keeps in float"),
    "llama.cpp": (dict(method="rtn", kv_bits=8, target="llama.cpp"), "target llama.cpp holds its own KV cache"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_kv_bits_refusals(case):
    options, words = REFUSED[case]
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        QuantConfig(**options)


def test_kv_bits_on_a_model_without_attention_is_refused():
    model = mambaquant.load("mamba-shakespeare")
    with pytest.raises(InputError, match="this MambaLM has no attention layer, so no KV cache to quantize"):
        mambaquant.quantize(model, method="rtn", kv_bits=4, calib=torch.randint(0, 256, (1, 16)))


CLI_REFUSED = {  # argv after `quantize SOURCE` -> words; one line, exit 2, nothing written
    "no attention": (["--method", "rtn"], "mamba-shakespeare", "has no attention layer"),
    "quamba": (["--method", "quamba"], "hybrid-shakespeare", "method quamba acts on the Mamba layers only"),
    "scope linear": (["--scope", "linear"], "hybrid-shakespeare", "which scope linear keeps in float"),
    "llama.cpp": (["--target", "llama.cpp", "--method", "rtn"], "hybrid-shakespeare", "holds its own KV cache"),
    "kv bits 32": (["--method", "quarot"], "hybrid-shakespeare", "bit width 32 is not supported"),
}


@pytest.mark.parametrize("case", CLI_REFUSED)
def test_kv_bits_refusals_through_the_cli(cli, tmp_path, case):
    argv, source, words = CLI_REFUSED[case]
    bits = "32" if case == "kv bits 32" else "4"
    result = cli.run("quantize", source, "--kv-bits", bits, *argv, "--no-eval", "--calib-samples", "2",
                     "--calib-len", "32", "--out", tmp_path / "q", cwd=tmp_path)
    assert_refused(result, words)
    assert list(tmp_path.iterdir()) == []


def test_compare_refuses_kv_bits_for_a_method_that_does_not_take_them(cli, tmp_path):
    result = cli.run("compare", "hybrid-shakespeare", "--kv-bits", "4", "--methods", "quamba2", cwd=tmp_path)
    assert_refused(result, "method quamba2 acts on the Mamba layers only")


def test_compare_labels_the_kv_cache_bits_and_takes_the_methods_that_quantize_it():
    from mambaquant.compare import compare, default_methods, plan

    assert "quamba" not in default_methods(4) and "quarot" in default_methods(4)
    assert plan(("fp", "rtn"), ("w8a8",), ("token",), kv_bits=4) == [("fp", "fp32", "none", "all"),
                                                                      ("rtn", "w8a8", "token", "all")]
    rows = compare("hybrid-shakespeare", methods=("fp", "rtn"), bits=("w4a16",), eval_samples=2, calib_samples=2,
                   calib_len=64, kv_bits=4)
    assert [(r.method, r.bits, r.scope) for r in rows] == [("fp", "fp32", "all"), ("rtn", "w4a16kv4", "all")]
    assert rows[1].value != rows[0].value


def test_the_query_key_hadamard_spreads_an_outlier_channel_of_the_keys(hybrids):
    """What the Hadamard is for: one key channel 20x the others (its query channels 20x smaller, the function
    unchanged) takes a per-(position, head) range for itself; turned by H its energy is spread over the head and
    the 4-bit cache's error falls."""
    models, _, ids = hybrids
    model = copy.deepcopy(models["granite-4.0-h dense"])  # no RoPE: 4 query heads of 16 on 2 key/value heads
    attention = attentions(model)[0]
    with torch.no_grad():
        attention.k_proj.weight[3] *= 20
        attention.q_proj.weight[[3, 16 + 3]] /= 20  # the query heads reading key/value head 0
    quantizer = ActivationQuantizer(QuantConfig(method="rtn", kv_bits=4).kv_cache_spec(16))

    def cache_error(m):
        keys = []
        attentions(m)[0].sites["k"].observers.append(lambda site, x: keys.append(x))
        logits(m, ids)
        return ((quantizer(keys[0]) - keys[0]).pow(2).sum() / keys[0].pow(2).sum()).item()

    rotated = copy.deepcopy(model)
    rotate_queries_keys(attentions(rotated)[0], seed=6)
    assert (logits(rotated, ids) - logits(model, ids)).abs().max() < 1e-4
    assert cache_error(rotated) < 0.6 * cache_error(model)  # 0.0027 against 0.0060 here
