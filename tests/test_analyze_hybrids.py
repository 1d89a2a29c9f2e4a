"""`mambaquant analyze` on hybrid language models: the attention, MLP and expert sites beside the Mamba ones, what
each transform does there (equal to what the methods' own transforms do to the tensors), the report and plots;
Zamba2's shared block analyzed at each depth that uses it."""

import copy
import json
import re

import pytest
import torch

import mambaquant
from mambaquant.analysis import analyze, capture, quantized_site_names
from mambaquant.analysis.stats import SketchConfig, residual_readers_weight, transform_statistics
from mambaquant.methods import activation_sites
from mambaquant.runtime.moe import MoE, experts_as_lists
from mambaquant.transforms.rotation import random_hadamard, rotate_down_input, rotate_heads
from mambaquant.transforms.smoothing import readers_weight, smooth_down_input, smooth_values

from .helpers import run_cli
from .test_analyze import captured

LAYERS = {"d_model": 32, "mamba1": {"d_model": 32, "d_state": 8},
          "mamba2": {"d_model": 32, "head_dim": 8, "d_state": 8}, "attention": {"d_model": 32, "n_heads": 4},
          "mlp": {"d_model": 32, "d_ff": 64}, "moe": {"d_model": 32, "d_ff": 16, "n_experts": 4, "top_k": 2}}


def hybrid(blocks: list[str], **changes) -> torch.nn.Module:
    """A random byte-level hybrid, its mixture of experts' router and experts redrawn ten times wider than `build`
    draws them, so that the routing differs from token to token and the experts' sites carry distinct values."""
    config = {"architecture": "hybrid-lm", "vocab_size": 256, "blocks": blocks}
    config |= {kind: {**fields, **changes.get(kind, {})} if isinstance(fields, dict) else fields
               for kind, fields in LAYERS.items()}
    model = mambaquant.build(config, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            for weight in (moe.router.weight, moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
                weight.normal_(0.0, 0.2, generator=generator)
    return model


@pytest.fixture
def batches():
    return list(torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(3)).split(3))


def test_analyze_reports_attention_and_mlp_sites_beside_the_mamba_ones(tmp_path):
    model = hybrid(["mamba2", "attention", "mlp", "moe"])
    out = tmp_path / "analysis"
    analyze(model, out, calib=torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)),
            methods=("rtn", "mambaquant"), bits=("w8a8",))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["layer_kinds"] == ["mamba2", "attention", "mlp", "moe"]
    transforms = {"none", "hadamard", "klt_hadamard", "smooth_hadamard"}
    expected = {"layers.0.norm": "norm", "layers.0.mixer.out_proj_in": "out_proj_in", "layers.0.mixer.h": "h",
                "layers.0.mixer.C": "C", "layers.1.norm": "norm", "layers.1.mixer.v": "v",
                "layers.1.mixer.o_proj_in": "o_proj_in", "layers.2.norm": "norm", "layers.2.mixer.down_in": "down_in",
                "layers.3.norm": "norm", "layers.3.mixer.experts.expert_down_in": "expert_down_in"}
    assert list(stats["transforms"]) == list(expected)
    for name, kind in expected.items():
        assert stats["sites"][name]["kind"] == kind, name
        measured = transforms - {"smooth_hadamard"} if kind == "expert_down_in" else transforms
        assert set(stats["transforms"][name]) == measured, name
        for after in stats["transforms"][name].values():
            assert after["variance_max_min"] >= 1 and after["crest_factor"] > 0, name
    assert stats["sites"]["layers.1.mixer.o_proj_in"]["auto"]["granularity"]  # a quantized site
    assert "auto" in stats["sites"]["layers.3.mixer.experts.expert_down_in"]  # each expert's down_in, pooled here
    assert {"o_proj_in", "down_in", "experts.down_in"} <= set(stats["sqnr"]["mambaquant"]["w8a8"]["kinds_db"])

    summary = (out / "summary.md").read_text()
    assert "| layers.1.mixer.o_proj_in | attention | attention o_proj input |" in summary
    assert "| layers.3.mixer.experts.expert_down_in | moe | experts' down_proj input (all experts) |" in summary
    assert re.search(r"\| layers\.3\.mixer\.experts\.expert_down_in \| moe \| [^|]+ \|( [^|]+ \|){3} - \|", summary)
    images = re.findall(r"<img src='([^']+)'", (out / "index.html").read_text())
    for image in ("transforms_o_proj_in_layer1.png", "transforms_v_layer1.png", "transforms_down_in_layer2.png",
                  "transforms_experts.expert_down_in_layer3.png", "profile_norm.png"):
        assert f"plots/{image}" in images, image
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image


def test_transform_statistics_are_what_the_methods_transforms_do(batches):
    """Falcon-H1's parallel mixer (grouped-query attention), a Mamba-1 block, an ungated GELU MLP (no smoothing
    passes it) and experts with a shared expert: the key sites of each, and after MambaQuant's smoothing and
    per-head Hadamard (attention) and its smoothing in up_proj and online Hadamard (the shared expert's MLP), the
    tensors the model computes have the channel statistics analyze predicted."""
    model = hybrid(["mamba1", "parallel", "mlp", "moe"], attention={"n_kv_heads": 2},
                   mlp={"gated": False, "activation": "gelu"}, moe={"shared_d_ff": 24})
    statistics = capture(model, batches, SketchConfig(covariance_rows=10**9, kept_rows=10**9), progress=False)
    results = transform_statistics(model, statistics, seed=0)
    assert list(results) == [
        "layers.0.norm", "layers.0.mixer.gate", "layers.0.mixer.out_proj_in", "layers.0.mixer.ssm.h",
        "layers.0.mixer.ssm.C", "layers.1.norm", "layers.1.mixer.mamba.out_proj_in", "layers.1.mixer.mamba.h",
        "layers.1.mixer.mamba.C", "layers.1.mixer.attention.v", "layers.1.mixer.attention.o_proj_in",
        "layers.2.norm", "layers.2.mixer.down_in", "layers.3.norm", "layers.3.mixer.experts.expert_down_in",
        "layers.3.mixer.shared_expert.down_in"]
    assert "smooth_hadamard" not in results["layers.2.mixer.down_in"]  # an ungated GELU passes no scale
    assert "smooth_hadamard" not in results["layers.3.mixer.experts.expert_down_in"]  # a scale per expert

    transformed = copy.deepcopy(model)
    attention, shared = transformed.layers[1].mixer.attention, transformed.layers[3].mixer.shared_expert
    smooth_values(attention, statistics["layers.1.mixer.attention.o_proj_in"].channel_absmax.float(), 0.5)
    rotate_heads(attention, random_hadamard(attention.config.head_dim, 3))  # the methods' seed + 3
    smooth_down_input(shared, statistics["layers.3.mixer.shared_expert.down_in"].channel_absmax.float(), 0.5)
    rotate_down_input(shared, 4)
    after = captured(transformed, batches, ["layers.1.mixer.attention.v", "layers.1.mixer.attention.o_proj_in",
                                            "layers.3.mixer.shared_expert.down_in"])
    for name, x in after.items():
        predicted = results[name]["smooth_hadamard"]
        assert predicted["channel_variance"] == pytest.approx(x.var(0, unbiased=False).tolist(), rel=1e-3), name
        assert predicted["kept_rows_channel_absmax"] == pytest.approx(x.abs().amax(0).tolist(), rel=1e-3), name


def test_the_experts_stacked_stand_for_the_experts_quantization_makes(batches):
    """The block norm's smoothing balances against the same columns as SmoothQuant's on the experts as MLPs, and
    the quantized sites of the full-precision model are those of the quantized one, each expert's input and
    down_proj input at the MoE's one site for all."""
    model = hybrid(["mamba2", "moe"], moe={"shared_d_ff": 24})
    listed = copy.deepcopy(model)
    experts_as_lists(listed)
    assert torch.equal(residual_readers_weight(model.layers[1]).abs().amax(0),
                       readers_weight(listed.layers[1].input_layers()).abs().amax(0))
    quantized = {site.name for site in activation_sites(listed)}
    per_expert = {name for name in quantized if re.search(r"\.experts\.\d+\.", name)}
    assert len(per_expert) == 8
    assert quantized_site_names(model) == quantized - per_expert | {"layers.1.mixer.expert_in",
                                                                    "layers.1.mixer.experts.expert_down_in"}


def test_zamba2_shared_block_sites_are_analyzed_at_every_depth(tmp_path):
    """Each hybrid layer's use of the shared attention and MLP block has its own sites (its own inputs), analyzed
    beside the Mamba-2 ones, from the CLI too."""
    zamba = mambaquant.build({"architecture": "hybrid-lm", "vocab_size": 256, "d_model": 32,
                              "blocks": ["mamba2", "zamba_hybrid", "zamba_hybrid"], "mamba2": LAYERS["mamba2"],
                              "attention": {"d_model": 32, "n_heads": 4, "input_size": 64}, "mlp": LAYERS["mlp"]})
    results = analyze(zamba, tmp_path / "analysis", calib=torch.randint(0, 256, (2, 16)),
                      methods=("rtn", "mambaquant"), bits=("w8a8",))
    for depth in (1, 2):
        for site in ("shared.attention.v", "shared.attention.o_proj_in", "shared.mlp.down_in", "mixer.out_proj_in"):
            assert f"layers.{depth}.{site}" in results["sites"], site
    first, second = (results["sites"][f"layers.{depth}.shared.mlp.down_in"] for depth in (1, 2))
    assert first != second  # the same weights, different inputs
    source = mambaquant.save(zamba, tmp_path / "zamba")
    code, _, stderr = run_cli("analyze", source, "--out", tmp_path / "cli", "--calib-samples", "2", "--methods",
                              "rtn")
    assert code == 0, stderr
    assert (tmp_path / "cli" / "stats.json").exists()
