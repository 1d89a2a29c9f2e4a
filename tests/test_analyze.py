"""`mambaquant analyze`: its statistics and SQNR against direct computations from captured tensors, and the CLI."""

import json
import re
from math import log10

import pytest
import torch

import mambaquant
from mambaquant.analysis import analyze, capture
from mambaquant.analysis.error import measure
from mambaquant.analysis.stats import SketchConfig, transformed_channels
from mambaquant.runtime import find_sites
from mambaquant.transforms.rotation import random_hadamard

from .helpers import run_cli

SITES = ("layers.1.norm", "layers.1.mixer.out_proj_in", "layers.2.mixer.ssm.h", "layers.0.mixer.ssm.dA")


@pytest.fixture
def batches():
    generator = torch.Generator().manual_seed(3)
    return list(torch.randint(0, 300, (6, 40), generator=generator).split(4))


def captured(model, batches, names) -> dict[str, torch.Tensor]:
    """The tensors at `names` over all batches, as (rows, channels) float64."""
    store = {name: [] for name in names}
    sites = find_sites(model)
    for name in names:
        sites[name].observers.append(lambda site, x: store[site.name].append(x.reshape(-1, x.shape[-1]).double()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for name in names:
        sites[name].observers.clear()
    return {name: torch.cat(tensors) for name, tensors in store.items()}


def test_site_statistics_match_a_direct_computation(small_lm, batches):
    with torch.no_grad():  # an outlier channel at the in_proj input, so the ratios are far from 1
        small_lm.layers[1].norm.weight[5] = 40.0
    direct = captured(small_lm, batches, SITES)
    statistics = capture(small_lm, batches, SketchConfig(covariance_rows=10**9), progress=False)
    for name, x in direct.items():
        summary = statistics[name].summary()
        channel_max = x.abs().amax(0)
        variance = x.var(0, unbiased=False)
        centred = x - x.mean()
        assert summary["rows"] == x.shape[0], name
        assert summary["absmax"] == pytest.approx(x.abs().max().item(), rel=1e-6), name
        assert summary["channel_absmax"] == pytest.approx(channel_max.tolist(), rel=1e-4, abs=1e-12), name
        ratio = channel_max.max() / channel_max.median()
        assert summary["channel_max_ratio"] == pytest.approx(ratio.item(), rel=1e-4), name
        kurtosis = (centred**4).mean() / (centred**2).mean() ** 2
        assert summary["kurtosis"] == pytest.approx(kurtosis.item(), rel=1e-6), name
        assert summary["variance_max_min"] == pytest.approx((variance.max() / variance.min()).item(), rel=1e-6), name
        assert summary["variance_cv"] == pytest.approx((variance.std(unbiased=False) / variance.mean()).item(),
                                                       rel=1e-6), name
        assert sum(summary["histogram"]) == x.numel(), name
    assert statistics["layers.1.norm"].summary()["channel_max_ratio"] > 10  # the planted outlier channel shows

    # the variance after a rotation, from the covariance, equals the variance of the rotated tensor
    x = direct["layers.1.mixer.out_proj_in"]
    rotation = random_hadamard(x.shape[1], seed=0)
    after = transformed_channels(statistics["layers.1.mixer.out_proj_in"], None, rotation)
    assert after["channel_variance"] == pytest.approx((x @ rotation.double()).var(0, unbiased=False).tolist(),
                                                      rel=1e-3)
    assert after["kept_rows_channel_absmax"] == pytest.approx((x @ rotation.double()).abs().amax(0).tolist(), rel=1e-4)


def test_sampled_covariance_keeps_exact_moments(small_lm, batches):
    name = "layers.2.mixer.ssm.h"
    direct = captured(small_lm, batches, [name])[name]
    statistics = capture(small_lm, batches, SketchConfig(covariance_rows=64), progress=False)[name]
    assert statistics.covariance.count < statistics.rows == direct.shape[0]
    assert statistics.kurtosis() == pytest.approx(((direct - direct.mean()) ** 4).mean().item()
                                                  / direct.var(unbiased=False).item() ** 2, rel=1e-6)


def test_sqnr_matches_a_direct_computation(small_lm, batches):
    quantized = mambaquant.quantize(small_lm, method="rtn", w_bits=8, a_bits=8, calib=torch.cat(batches))
    result = measure(quantized, small_lm, batches)
    name = "layers.1.mixer.out_proj_in"  # quantized by out_proj itself (static per tensor, int8 symmetric)
    x = captured(quantized, batches, [name])[name]
    quantizer = quantized.layers[1].mixer.out_proj.input_quantizer
    scale = torch.maximum(-quantizer.low, quantizer.high).double() / 127
    error = x - (x / scale).round().clamp(-127, 127) * scale
    assert result["sites_db"][name] == pytest.approx(10 * log10(x.square().sum() / error.square().sum()), abs=1e-6)
    with torch.no_grad():
        reference = torch.cat([small_lm(b) for b in batches]).double()
        output = torch.cat([quantized(b) for b in batches]).double()
    expected = 10 * log10(reference.square().sum() / (output - reference).square().sum())
    assert result["output_db"] == pytest.approx(expected, abs=1e-6)
    assert 10 < result["layers_db"]["1"] < 60 and set(result["layers_db"]) == {"0", "1", "2", "head"}


def test_cli_writes_the_report_and_refuses_an_existing_directory(small_lm, tmp_path):
    source = mambaquant.save(small_lm, tmp_path / "model")
    out = tmp_path / "analysis"
    code, stdout, stderr = run_cli("analyze", source, "--out", out, "--calib-samples", "4", "--calib-len", "32",
                                   "--methods", "rtn,mambaquant")
    assert code == 0, stderr
    assert "mambaquant W4A8: activation SQNR" in stdout
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["sqnr"]) == {"rtn", "mambaquant"} and set(stats["sqnr"]["rtn"]) == {"w8a8", "w4a8"}
    assert stats["sites"]["layers.0.mixer.ssm.h"]["channels"] == 8  # d_state: the scan sites' channel
    assert "| layers.0.mixer.out_proj_in |" in (out / "summary.md").read_text()
    images = re.findall(r"<img src='([^']+)'", (out / "index.html").read_text())
    assert "plots/transforms_out_proj_in_layer1.png" in images and len(images) >= 20
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image

    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, _, stderr = run_cli("analyze", source, "--out", out, "--calib-samples", "4")
    assert code == 2 and "already exists" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, nothing left


def test_cli_bad_methods_exit_2_before_any_work(tmp_path):
    code, _, stderr = run_cli("analyze", "mamba-shakespeare", "--out", tmp_path / "a", "--methods", "rtn,nope")
    assert code == 2 and "unknown method(s) nope" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("w_bits", [8, 16])  # 16: only the activations quantized, no QuantizedLinear at all
def test_a_quantized_checkpoint_is_refused_before_any_work(small_lm, tmp_path, w_bits):
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    quantized = mambaquant.quantize(small_lm, method="rtn", w_bits=w_bits, a_bits=8, calib=calib, calib_samples=4)
    source = mambaquant.save(quantized, tmp_path / "quantized")
    out = tmp_path / "analysis"
    code, _, stderr = run_cli("analyze", source, "--out", out, "--calib-samples", "4")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert f"{source} is a quantized checkpoint; analyze takes a full-precision model (the one you quantized)" in stderr
    assert not out.exists()
    with pytest.raises(mambaquant.InputError, match="is a quantized model; analyze takes a full-precision model"):
        analyze(quantized, out)
    assert not out.exists()
