import pytest
import torch

from mambaquant.runtime import SITES, find_sites, use_reference_scan
from mambaquant.runtime.lm import sample

from .helpers import rel_err


@torch.no_grad()
def test_reference_and_fast_scan_models_agree(small_lm, small_vim):
    ids = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fast_lm, fast_vim = small_lm(ids), small_vim(images)
    use_reference_scan(small_lm), use_reference_scan(small_vim)
    assert rel_err(fast_lm, small_lm(ids)) < 1e-5
    assert rel_err(fast_vim, small_vim(images)) < 1e-5


@torch.no_grad()
def test_recurrent_steps_equal_full_forward(small_lm):
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(2))
    full = small_lm(ids)
    cache = small_lm.new_cache(2)
    prefix = small_lm(ids[:, :11], cache)
    steps = [small_lm(ids[:, t : t + 1], cache) for t in range(11, 30)]
    assert rel_err(torch.cat([prefix, *steps], dim=1), full) < 1e-5


@torch.no_grad()
def test_greedy_generation_matches_argmax_of_full_forward(small_lm):
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    new = small_lm.generate(prompt, max_new_tokens=12, temperature=0)
    sequence = torch.cat([prompt, new], dim=1)
    logits = small_lm(sequence[:, :-1])
    assert torch.equal(logits[:, 8:].argmax(-1), new)


def test_a_vanishing_temperature_is_greedy_and_a_normal_one_samples_as_before():
    """logits / T overflows float32 for T below about 1e-38 (and T rounds to 0 below about 1e-45): the limit is
    greedy decoding, not a NaN distribution. Above that, the same seeded draws as softmax(logits / T) always gave."""
    logits = 4 * torch.randn(3, 300, generator=torch.Generator().manual_seed(0))
    logits[2] = 0.0  # all equal: 0 / T rounds to 0 / 0 where T does
    for temperature in (1e-38, 1e-40, 1e-45, 1e-46, 1e-300, 5e-324):
        for top_k in (None, 5):
            assert torch.equal(sample(logits, temperature, top_k, torch.Generator()), logits.argmax(-1)), temperature
    for temperature, top_k in ((0.8, None), (1.0, 5), (1e-3, None)):
        draws = [sample(logits, temperature, top_k, torch.Generator().manual_seed(seed)) for seed in range(20)]
        scaled = logits / temperature
        if top_k is not None:
            scaled = scaled.masked_fill(scaled < scaled.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
        before = [torch.multinomial(scaled.softmax(-1), 1, generator=torch.Generator().manual_seed(seed))[:, 0]
                  for seed in range(20)]
        assert all(torch.equal(a, b) for a, b in zip(draws, before))
    assert len({tuple(draw.tolist()) for draw in draws}) > 1  # sampled, not greedy


def test_every_site_is_named_and_seen_with_its_documented_rank(small_lm, small_vim):
    lm_sites = find_sites(small_lm)
    assert {s.kind for s in lm_sites.values()} == set(SITES) - {"hidden"}  # an MLP head's
    assert "layers.2.mixer.ssm.h" in lm_sites and "layers.0.norm" in lm_sites and "norm_f" in lm_sites
    assert "layers.1.mixer.ssm_b.h" in find_sites(small_vim)
    seen = {}
    for site in lm_sites.values():
        site.observers.append(lambda s, x: seen.setdefault(s.name, tuple(x.shape)))
    with torch.no_grad():
        small_lm(torch.randint(0, 300, (2, 20)))
    assert list(seen) == list(lm_sites)  # find_sites lists them in forward order
    assert seen["layers.0.mixer.ssm.h"][:1] + seen["layers.0.mixer.ssm.h"][2:] == (2, 128, 8)
    assert seen["layers.0.mixer.ssm.dt_low"] == (2, 20, 4)
    assert seen["layers.0.mixer.out_proj_in"] == (2, 20, 128)


class Zero(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@torch.no_grad()
def test_site_op_changes_the_function(small_lm):
    ids = torch.randint(0, 300, (1, 16))
    before = small_lm(ids)
    for layer in small_lm.layers:
        layer.mixer.sites["out_proj_in"].op = torch.nn.Identity()
    assert torch.equal(small_lm(ids), before)  # an identity op is exact
    for layer in small_lm.layers:
        layer.mixer.sites["out_proj_in"].op = Zero()
    residual_only = small_lm.lm_head(small_lm.norm_f(small_lm.embedding(ids)))
    assert torch.allclose(small_lm(ids), residual_only, atol=1e-6)


def test_bidirectional_language_model_is_rejected():
    from mambaquant.runtime import LMConfig, MambaLM

    with pytest.raises(ValueError, match="causal blocks"):
        MambaLM(LMConfig(d_model=16, n_layer=1, vocab_size=256, bidirectional="separate"))
    with pytest.raises(ValueError, match="bidirectional must be one of"):
        LMConfig(bidirectional="both")
