"""Every method on Mamba-2 blocks: at 16 bits the transforms keep the function (random shapes, the mamba2-130m
widths and a Codestral layout of 8 B/C groups); Quamba2's reordering and clusters; quantized checkpoints reload
exactly and run bit-identically on the int8 backend; the toolchain (CLI quantize / eval / generate / compare /
analyze) takes Mamba-2 models; options that make no sense for a block kind are refused in one line."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mambaquant
from mambaquant.compare import compare
from mambaquant.errors import InputError
from mambaquant.methods import METHODS, set_backend
from mambaquant.methods.quamba2 import cluster_sorted, sort_and_cluster
from mambaquant.quant.quantizer import ActivationQuantizer
from mambaquant.runtime import Mamba2LMConfig, MambaLM, init_weights
from mambaquant.transforms.reorder import reorder_heads_and_channels

from .cli_cases import assert_refused
from .helpers import rel_err

TEXT = Path(mambaquant.__file__).parent / "data" / "tinyshakespeare_train_head.txt"


def mamba2_lm(seed: int = 0, **overrides) -> MambaLM:
    values = dict(d_model=64, n_layer=2, d_state=16, head_dim=16, n_groups=2, vocab_size=256, tie_embeddings=False)
    model = init_weights(MambaLM(Mamba2LMConfig(**{**values, **overrides})), seed=seed).eval()
    with torch.no_grad():  # D, dt_bias and the norms away from their initial values, so that every one matters
        for name, p in model.named_parameters():
            if p.dim() == 1 and "A_log" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + len(name))))
    return model


def tokens(seed: int, shape=(3, 40), vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(METHODS[1:]), d_model=st.sampled_from([32, 48, 64]), head_dim=st.sampled_from([8, 16]),
       n_groups=st.sampled_from([1, 2, 4]), d_state=st.sampled_from([4, 8, 16]), mlp=st.booleans(),
       bias=st.booleans(), tied=st.booleans(), dt_limit=st.booleans(), n_layer=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_every_recipe_keeps_the_function_on_random_mamba2_shapes(method, d_model, head_dim, n_groups, d_state, mlp,
                                                                  bias, tied, dt_limit, n_layer, seed):
    """16 bits quantize nothing: what is left are the method's transforms (smoothing into the norms and the conv,
    the online scales and rotations at B, C and h, Quamba2's reordering), which must keep the function."""
    d_ssm = d_model if mlp else 0  # with the MLP part: half of d_inner
    assume(((d_ssm or 2 * d_model) // head_dim) % n_groups == 0)
    model = mamba2_lm(seed, d_model=d_model, head_dim=head_dim, n_groups=n_groups, d_state=d_state, d_ssm=d_ssm,
                      bias=bias, tie_embeddings=tied, n_layer=n_layer,
                      dt_limit_min=0.01 if dt_limit else 0.0, dt_limit_max=0.5 if dt_limit else 0.0)
    transformed = mambaquant.quantize(model, method=method, w_bits=16, a_bits=16, calib=tokens(seed))
    x = tokens(seed + 1, (2, 70))  # longer than a scan chunk: the state carried between chunks is transformed too
    with torch.no_grad():
        assert rel_err(transformed(x), model(x)) < 1e-4


@pytest.mark.parametrize("layout", ["mamba2-130m", "codestral"])
def test_every_recipe_keeps_the_function_on_the_real_layouts(layout):
    """The mamba2-130m widths (d_model 768, 24 heads of 64, d_state 128, one group, its vocabulary) and Codestral
    Mamba's layout (8 B/C groups of d_state 128, heads of 64), two blocks each."""
    if layout == "mamba2-130m":
        config = dict(d_model=768, d_state=128, head_dim=64, n_groups=1, vocab_size=50280, tie_embeddings=True)
    else:
        config = dict(d_model=512, d_state=128, head_dim=64, n_groups=8, vocab_size=1024, tie_embeddings=False)
    model = mamba2_lm(3, n_layer=2, **config)
    x = tokens(5, (1, 80), config["vocab_size"])
    with torch.no_grad():
        reference = model(x)
    for method in METHODS[1:]:
        transformed = mambaquant.quantize(model, method=method, w_bits=16, a_bits=16,
                                          calib=tokens(4, (2, 32), config["vocab_size"]))
        with torch.no_grad():
            assert rel_err(transformed(x), reference) < 1e-4, method


def test_head_and_channel_reordering_keeps_the_function():
    model = mamba2_lm(7, n_groups=2, d_ssm=64, bias=True)  # 4 heads of 16 in 2 groups, and an MLP part
    x = tokens(8)
    with torch.no_grad():
        reference = model(x)
        for seed, layer in enumerate(model.layers):
            g = torch.Generator().manual_seed(seed)
            c = layer.mixer.config
            per_group = c.n_heads // c.n_groups
            head_order = torch.cat([group * per_group + torch.randperm(per_group, generator=g)
                                    for group in range(c.n_groups)])
            channel_orders = torch.stack([torch.randperm(c.head_dim, generator=g) for _ in range(c.n_heads)])
            reorder_heads_and_channels(layer.mixer, head_order, channel_orders)
        assert rel_err(model(x), reference) < 1e-5
        with pytest.raises(ValueError, match="inside its group"):  # a head moved to another group's B and C
            reorder_heads_and_channels(model.layers[0].mixer, torch.tensor([2, 1, 0, 3]), channel_orders)


def test_one_dimensional_clustering_is_optimal_and_contiguous():
    values = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 9.0, 9.2, 9.4])
    assert cluster_sorted(values, 3).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert cluster_sorted(values, 1).tolist() == [0] * 8
    assert cluster_sorted(values[:2], 4).tolist() == [0, 1]  # never more clusters than values
    head_order, channel_orders, clusters = sort_and_cluster(torch.rand(64) + 0.1, Mamba2LMConfig(
        d_model=32, head_dim=8, n_groups=2), head_clusters=2, channel_clusters=3)
    assert sorted(head_order[:4].tolist()) == [0, 1, 2, 3] and sorted(head_order[4:].tolist()) == [4, 5, 6, 7]
    assert channel_orders.shape == (8, 8) and len(clusters.unique()) <= 2 * 2 * 3
    assert (clusters.view(8, 8).diff(dim=1) >= 0).all()  # each cluster contiguous inside every head


def test_quamba2_scales_are_shared_by_its_clusters_and_groups():
    model = mamba2_lm(9, n_groups=2)
    quantized = mambaquant.quantize(model, method="quamba2", w_bits=8, a_bits=8, calib=tokens(10),
                                    head_clusters=2, channel_clusters=2)
    mixer = quantized.layers[0].mixer
    x_quantizer = mixer.sites["x"].op
    assert isinstance(x_quantizer, ActivationQuantizer) and x_quantizer.spec.granularity == "channel"
    assert x_quantizer.spec.observer == "percentile"
    assert 1 < len(torch.stack([x_quantizer.low, x_quantizer.high], 1).unique(dim=0)) <= 2 * 2 * 2
    for kind in ("B", "C"):
        high = mixer.sites[kind].op.high.view(2, -1)  # n_groups x d_state
        assert (high == high[:, :1]).all() and high[0, 0] != high[1, 0]
    report = quantized.quantization_report
    assert "static per cluster of channels" in report.granularity_reasons["layers.0.mixer.x"]
    assert "sort-and-cluster" in report.transforms[0]


def test_auto_granularity_decides_every_mamba2_site():
    quantized = mambaquant.quantize(mamba2_lm(11), method="mambaquant", w_bits=8, a_bits=8, calib=tokens(12))
    reasons = quantized.quantization_report.granularity_reasons
    for kind in ("xBC", "x", "B", "C", "h", "out_proj_in"):
        assert reasons[f"layers.1.mixer.{kind}"].startswith(("static per tensor", "dynamic per token")), kind
    assert reasons["layers.0.norm"] and len(quantized.quantization_report.activation_sites) == 2 * 7 + 1


@pytest.mark.parametrize("method", METHODS[1:])
def test_quantized_mamba2_reloads_exactly_and_int8_is_bit_identical(method, tmp_path):
    model = mamba2_lm(13, tie_embeddings=method in ("rtn", "mambaquant"), bias=method == "smoothquant")
    x = tokens(14, (2, 50))
    for w_bits, a_bits, granularity in [(8, 8, None), (4, 8, "token"), (4, 16, None)]:
        quantized = mambaquant.quantize(model, method=method, w_bits=w_bits, a_bits=a_bits, calib=tokens(15),
                                        act_granularity=granularity)
        directory = tmp_path / f"{method}-w{w_bits}a{a_bits}"
        mambaquant.save(quantized, directory)
        assert json.loads((directory / "config.json").read_text())["model_class"] == "Mamba2LM"
        reloaded = mambaquant.load(directory)
        with torch.no_grad():
            expected = quantized(x)
            assert torch.equal(reloaded(x), expected)
            if a_bits == 8:
                assert torch.equal(set_backend(reloaded, "int8")(x), expected)
        assert reloaded.quantization_report.activation_sites == quantized.quantization_report.activation_sites


def test_compare_runs_quamba2_on_mamba2_only(small_lm):
    rows = compare(mamba2_lm(16), bits=("w4a16",), eval_samples=2, calib=tokens(17), calib_samples=3)
    assert [r.method for r in rows] == list(METHODS)
    rows = compare(small_lm, bits=("w4a16",), eval_samples=2, calib_samples=2, calib_len=16)
    assert "quamba2" not in [r.method for r in rows] and len(rows) == len(METHODS) - 1
    with pytest.raises(InputError, match="method quamba2 quantizes Mamba-2 blocks"):
        compare(small_lm, methods=("fp", "quamba2"), bits=("w8a8",), eval_samples=2)


@pytest.fixture(scope="module")
def mamba2_directory(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("mamba2-methods") / "tiny"
    mambaquant.save(mamba2_lm(18, tie_embeddings=True), directory)
    return directory


def test_the_cli_quantizes_saves_evaluates_generates_and_analyzes_mamba2(cli, mamba2_directory):
    out = mamba2_directory.parent / "quantized"
    result = cli.run("quantize", mamba2_directory, "--method", "quamba2", "--calib", TEXT, "--calib-samples", "4",
                     "--calib-len", "64", "--eval-samples", "2", "--head-clusters", "2", "--out", out)
    assert result.code == 0, result.stderr
    assert "sort-and-cluster" in result.stdout and "in_proj, out_proj of every block" in result.stdout
    for backend in ("fake", "int8"):
        evaluated = cli.run("eval", out, "--eval-samples", "2", "--json", "--backend", backend)
        assert evaluated.code == 0, evaluated.stderr
        assert json.loads(evaluated.stdout)["metric"] == "bits_per_byte"
    generated = cli.run("generate", out, "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0")
    assert generated.code == 0 and generated.stdout.startswith("ROMEO:"), generated.stderr
    report = mamba2_directory.parent / "report"
    analyzed = cli.run("analyze", mamba2_directory, "--out", report, "--calib", TEXT, "--calib-samples", "4",
                       "--calib-len", "64", "--methods", "rtn,quamba2,mambaquant")
    assert analyzed.code == 0, analyzed.stderr
    stats = json.loads((report / "stats.json").read_text())
    assert set(stats["sqnr"]) == {"rtn", "quamba2", "mambaquant"}
    assert {"layers.0.mixer.h", "layers.0.mixer.C", "layers.0.mixer.out_proj_in"} <= set(stats["transforms"])
    assert "| layers.0.mixer | " in (report / "summary.md").read_text()  # the scan's kurtosis row


def test_options_that_do_not_fit_the_block_kind_are_refused(cli, mamba2_directory):
    assert_refused(cli.run("quantize", "mamba-shakespeare", "--method", "quamba2", "--no-eval"),
                   "method quamba2 quantizes Mamba-2 blocks", "MambaLM has Mamba-1 blocks", "use quamba")
    assert_refused(cli.run("quantize", mamba2_directory, "--method", "rtn", "--head-clusters", "2", "--no-eval"),
                   "head_clusters is an option of method quamba2", "not of rtn")
    assert_refused(cli.run("analyze", "mamba-shakespeare", "--methods", "quamba2", "--out",
                           mamba2_directory.parent / "never"), "method quamba2 quantizes Mamba-2 blocks")
    assert not (mamba2_directory.parent / "never").exists()
    with pytest.raises(InputError, match="channel_clusters must be an integer from 1 to 1024"):
        mambaquant.QuantConfig(method="quamba2", channel_clusters=0)


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_a_quantized_model_generates_what_its_full_forward_predicts(kind, small_lm):
    """Cached decoding through quantized linears (whose float weight is gone) and static activation quantizers."""
    model = small_lm if kind == "mamba1" else mamba2_lm(19)
    quantized = mambaquant.quantize(model, method="mambaquant", w_bits=8, a_bits=8, act_granularity="tensor",
                                    calib=tokens(20, (3, 40), model.config.vocab_size))
    prompt = tokens(21, (1, 12), model.config.vocab_size)
    with torch.no_grad():
        generated = quantized.generate(prompt, 6, 0.0, None, None)
        sequence = prompt
        for _ in range(6):
            sequence = torch.cat([sequence, quantized(sequence)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated[0], sequence[0, 12:])
