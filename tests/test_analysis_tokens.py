"""`mambaquant analyze`: token-wise outliers (share, positions, the auto granularity beside them) and a tensor
calibration set."""

import json
import re

import pytest
import torch

from mambaquant.analysis import AnalysisConfig, analyze, capture, describe_calibration
from mambaquant.analysis.stats import POSITION_BINS, SiteStatistics, SketchConfig
from mambaquant.runtime import LMConfig, MambaLM, MambaTagger, Site, TaggerConfig, find_sites, init_weights


def planted(batch: int, length: int, positions: dict[int, int]) -> torch.Tensor:
    """Normal values; at each position, one channel of 100 in its first `samples` sequences."""
    x = torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(0))
    for position, samples in positions.items():
        x[:samples, position, 5] = 100.0
    return x


def observed(x: torch.Tensor, absolute: bool, kind: str = "out_proj_in") -> SiteStatistics:
    statistics = SiteStatistics(SketchConfig(), auto=True, absolute=absolute)
    for part in x.split(3):  # streamed over batches
        statistics(Site(kind), part)
    return statistics


def test_outlier_tokens_found_at_their_positions():
    x = planted(8, 20, {3: 8, 7: 4})
    statistics = observed(x, absolute=True)
    tokens = statistics.summary()["tokens"]
    token_max = x.abs().amax(-1)
    assert tokens["tokens"] == 160 and tokens["positions"] == "absolute"
    assert tokens["median_max"] == pytest.approx(token_max.median().item(), rel=0.08)  # from a histogram
    assert tokens["position_max"] == pytest.approx(token_max.amax(0).tolist(), rel=1e-4)
    for k in ("5", "10"):
        outliers = tokens["outliers"][k]
        assert outliers["share"] == pytest.approx(12 / 160, abs=1e-9), k
        top = [(p["position"], p["share"], p["of_outliers"]) for p in outliers["top_positions"]]
        assert top == [(3, 1.0, pytest.approx(8 / 12, rel=1e-4)), (7, 0.5, pytest.approx(4 / 12, rel=1e-4))], k
        assert sum(outliers["position_share"]) == pytest.approx(1.5)
    granularity, reason = statistics.auto_choice(fixed_length=False).values()
    assert granularity == "token" and "7.50 % of tokens above 10x" in reason


def test_relative_positions_for_variable_lengths():
    statistics = SiteStatistics(SketchConfig())
    statistics(Site("norm"), planted(4, 64, {0: 4, 1: 4, 40: 2}))  # bin 0 holds positions 0 and 1 of 64
    statistics(Site("norm"), planted(4, 32, {0: 4, 20: 4}))  # position 20 of 32 is in bin 20, as is 40 of 64
    tokens = statistics.summary()["tokens"]
    assert tokens["positions"] == f"relative, {POSITION_BINS} bins" and tokens["tokens"] == 4 * 64 + 4 * 32
    assert tokens["position_tokens"][0] == 4 * 2 + 4 and tokens["position_tokens"][20] == 4 * 2 + 4
    top = tokens["outliers"]["10"]["top_positions"]
    assert [(p["position"], p["share"]) for p in top] == [(0, 1.0), (20, 0.5)]
    assert tokens["outliers"]["10"]["share"] == pytest.approx(18 / 384, abs=1e-9)


def scan_states(model, batches, name) -> list[torch.Tensor]:
    """The state h at `name`, each forward pass's chunks joined along time: (B, T, E, N) per batch."""
    site, chunks, per_batch = find_sites(model)[name], [], []
    site.observers.append(lambda _, x: chunks.append(x.clone()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
            per_batch.append(torch.cat(chunks, 1))
            chunks.clear()
    site.observers.clear()
    return per_batch


def test_scan_positions_in_input_order(small_vim):
    """The chunked scan sites: positions over a forward pass's chunks, a backward branch mapped back; a shared
    bidirectional scan's second pass (time steps L to 2L - 1) too."""
    images = list(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)).split(4))
    name = "layers.1.mixer.ssm_b.h"
    direct = torch.cat(scan_states(small_vim, images, name)).flip(1).abs().amax((0, 2, 3))
    tokens = capture(small_vim, images, SketchConfig(), progress=False)[name].summary()["tokens"]
    assert tokens["positions"] == "absolute" and tokens["position_max"] == pytest.approx(direct.tolist(), rel=1e-4)

    tagger = init_weights(MambaTagger(TaggerConfig(d_model=16, n_layer=1, d_state=4, vocab_size=64, conv="same",
                                                   bidirectional="shared")), seed=0).eval()
    texts = [torch.randint(0, 64, (3, 64), generator=torch.Generator().manual_seed(2))]
    name = "layers.0.mixer.ssm.h"
    states = scan_states(tagger, texts, name)[0].abs().amax((2, 3))  # (B, 2L)
    per_position = torch.maximum(states[:, :64], states[:, 64:].flip(1)).view(3, 32, 2).amax((0, 2))
    tokens = capture(tagger, texts, SketchConfig(), progress=False)[name].summary()["tokens"]
    assert tokens["tokens"] == 2 * 3 * 64 and tokens["position_max"] == pytest.approx(per_position.tolist(), rel=1e-4)


def test_analyze_with_a_tensor_calibration_set(tmp_path):
    """A tensor as calib ran the whole statistics pass, then failed on `calib or ...`; the report has the token
    statistics, what auto chooses, and their plots."""
    model = init_weights(MambaLM(LMConfig(d_model=32, n_layer=2, vocab_size=256)), seed=0).eval()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "analysis"
    analyze(model, out, AnalysisConfig(calib=calib, methods=("mambaquant",), bits=("w8a8",)))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["calibration"]["set"] == "user tensor (4, 32)" and stats["calibration"]["samples"] == 4
    for name, site in stats["sites"].items():
        tokens = site["tokens"]
        assert tokens["tokens"] == 4 * 32 and set(tokens["outliers"]) == {"5", "10"}, name
        assert len(tokens["position_max"]) == len(tokens["outliers"]["10"]["position_share"]) == POSITION_BINS, name
        assert {"share", "top_positions"} <= set(tokens["outliers"]["5"]), name
    h = stats["sites"]["layers.1.mixer.ssm.h"]
    assert h["auto"]["granularity"] in ("tensor", "token") and "median token max" in h["auto"]["reason"]
    assert "auto" not in stats["sites"]["layers.1.mixer.ssm.dA"]  # not quantized: nothing to decide
    assert "layers.1.mixer.ssm.h" in stats["sqnr"]["mambaquant"]["w8a8"]["granularity_reasons"]
    assert "## Token-wise outliers and the auto activation granularity" in (out / "summary.md").read_text()
    images = re.findall(r"<img src='([^']+)'", (out / "index.html").read_text())
    assert {"plots/token_outliers.png", "plots/token_positions_ssm.h.png"} <= set(images)
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image


def test_calibration_descriptions():
    assert describe_calibration(None) == "the model's default training set"
    assert describe_calibration("shakespeare-train") == "shakespeare-train"
    assert describe_calibration(torch.zeros(2, 8, dtype=torch.long)) == "user tensor (2, 8)"
    assert describe_calibration([torch.zeros(8)] * 3) == "user list of 3 items"
    assert describe_calibration(iter([])) == "user list_iterator"
