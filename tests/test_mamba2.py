"""The Mamba-2 runtime: the chunked SSD scan against the step-by-step reference, cached decoding against a full
prefill, the sites, and the whole model against transformers' own Mamba2ForCausalLM on random models of the real
configurations (in memory, through save_pretrained directories, sharded, the state-spaces layout, bare files)."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import Mamba2Config, Mamba2ForCausalLM

import mambaquant
from mambaquant.errors import InputError
from mambaquant.quant.quantizer import ActivationQuantizer, QuantSpec
from mambaquant.runtime import (MAMBA2_SITES, Mamba2LMConfig, MambaLM, find_sites, init_weights, ssd_scan,
                                ssd_scan_reference, use_reference_scan)
from mambaquant.runtime import ssd
from mambaquant.runtime.sites import Site
from mambaquant.transforms.rotation import Rotate

from .cli_cases import assert_refused
from .helpers import rel_err

REAL_CONFIGS = {  # state-spaces/mamba2-130m and mamba2-370m; Codestral's layout (n_groups 8), scaled down
    "130m": dict(hidden_size=768, num_hidden_layers=24, num_heads=24, n_groups=1, vocab_size=50288,
                 tie_word_embeddings=True),
    "370m": dict(hidden_size=1024, num_hidden_layers=48, num_heads=32, n_groups=1, vocab_size=50288,
                 tie_word_embeddings=True),
    "codestral-layout": dict(hidden_size=512, num_hidden_layers=4, num_heads=16, n_groups=8, vocab_size=32768,
                             tie_word_embeddings=False),
}


def random_hf(size: str, seed: int = 0, **overrides) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    values = {"state_size": 128, "head_dim": 64, "expand": 2, "initializer_range": 0.02, **REAL_CONFIGS[size],
              **overrides}
    return Mamba2ForCausalLM(Mamba2Config(**values)).eval()


def fresh_ids(seed: int, length: int, vocab: int = 32768, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def small_lm(seed: int = 0, **overrides) -> MambaLM:
    values = dict(d_model=64, n_layer=2, d_state=16, head_dim=16, n_groups=2, vocab_size=300, tie_embeddings=False)
    model = init_weights(MambaLM(Mamba2LMConfig(**{**values, **overrides})), seed=seed).eval()
    with torch.no_grad():  # D and the norms away from their initial ones, so that every parameter matters
        for name, p in model.named_parameters():
            if p.dim() == 1 and "A_log" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + len(name))))
    return model


def scan_inputs(seed, batch, length, heads, head_dim, groups, state):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=g)
    dt = torch.rand(batch, length, heads, generator=g) * 0.3
    A = -torch.rand(heads, generator=g) * 3 - 0.05
    B = torch.randn(batch, length, groups, state, generator=g)
    C = torch.randn(batch, length, groups, state, generator=g)
    h0 = torch.randn(batch, heads, head_dim, state, generator=g)
    return x, dt, A, B, C, h0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), batch=st.integers(1, 2), length=st.integers(1, 150),
       groups=st.sampled_from([1, 2, 4]), per_group=st.integers(1, 3), head_dim=st.sampled_from([1, 4, 8]),
       state=st.sampled_from([1, 8, 16]), chunk=st.sampled_from([1, 7, 16, 64]), start=st.booleans())
def test_chunked_scan_equals_reference(seed, batch, length, groups, per_group, head_dim, state, chunk, start):
    x, dt, A, B, C, h0 = scan_inputs(seed, batch, length, groups * per_group, head_dim, groups, state)
    h0 = h0 if start else None
    expected, expected_h = ssd_scan_reference(x, dt, A, B, C, state=h0)
    got, got_h = ssd_scan(x, dt, A, B, C, state=h0, chunk=chunk)
    assert rel_err(got, expected) < 1e-5
    assert rel_err(got_h, expected_h) < 1e-5


def test_h_hook_changes_only_the_output_operand_in_both_scans():
    x, dt, A, B, C, h0 = scan_inputs(1, 2, 70, 4, 8, 2, 16)

    def hook(h):  # (b, T, H, P, N)
        assert h.dim() == 5 and h.shape[2:] == (4, 8, 16)
        return h.round()

    expected, expected_h = ssd_scan_reference(x, dt, A, B, C, state=h0, h_hook=hook)
    got, got_h = ssd_scan(x, dt, A, B, C, state=h0, h_hook=hook, chunk=16)
    assert rel_err(got, expected) < 1e-5
    assert rel_err(got_h, ssd_scan_reference(x, dt, A, B, C, state=h0)[1]) < 1e-5  # the recurrence stays exact
    assert rel_err(got, ssd_scan(x, dt, A, B, C, state=h0)[0]) > 1e-3  # and the hook did act


class RecordSteps(torch.nn.Module):
    per_token = True

    def __init__(self, sizes: list):
        super().__init__()
        self.sizes = sizes

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.sizes.append(h.shape[1])
        return h


def per_token_h_site(seed: int, state: int) -> Site:
    """A calibrated h site as the methods leave it: a rotation along the state, then a static 8-bit quantizer."""
    site = Site("h", "mamba2")
    quantizer = ActivationQuantizer(QuantSpec(8))
    quantizer.observe(site, 3 * torch.randn(1000, generator=torch.Generator().manual_seed(seed)))
    rotation = torch.linalg.qr(torch.randn(state, state, generator=torch.Generator().manual_seed(seed)))[0]
    site.op = torch.nn.Sequential(Rotate(state, rotation), quantizer)
    return site


def test_a_per_token_h_site_is_handed_a_few_steps_at_a_time_with_the_same_result(monkeypatch):
    """The states of a chunk are handed to a per-token site in pieces of at most HOOK_BYTES (at the 130m
    configuration a chunk's states are 50 MiB): the output equals the site applied to whole chunks."""
    x, dt, A, B, C, h0 = scan_inputs(4, 2, 70, 4, 8, 2, 16)
    site = per_token_h_site(4, 16)
    assert site.per_token
    whole, whole_h = ssd_scan(x, dt, A, B, C, state=h0, h_hook=lambda h: site(h))  # a plain callable: whole chunks
    step_bytes = h0.numel() * h0.element_size()
    monkeypatch.setattr(ssd, "HOOK_BYTES", 3 * step_bytes)
    sizes = []
    site.observers.append(lambda _, h: sizes.append(h.shape[1]))
    assert not site.per_token  # an observer may pool what it is given: whole chunks again
    ssd_scan(x, dt, A, B, C, state=h0, h_hook=site)
    assert sizes == [64, 6]
    site.observers.clear()
    sizes.clear()
    site.op.append(RecordSteps(sizes))
    got, got_h = ssd_scan(x, dt, A, B, C, state=h0, h_hook=site)
    assert sizes == [3] * 23 + [1]
    assert torch.equal(got_h, whole_h)
    assert rel_err(got, whole) < 1e-6
    assert rel_err(got, ssd_scan_reference(x, dt, A, B, C, state=h0, h_hook=site)[0]) < 1e-5
    assert rel_err(got, ssd_scan(x, dt, A, B, C, state=h0)[0]) > 1e-3  # the site did act
    site.op.append(torch.nn.Identity())  # an op that does not declare per_token: whole chunks
    assert not site.per_token


@pytest.mark.parametrize("spec, per_token", [
    (QuantSpec(8), True), (QuantSpec(8, granularity="token", dynamic=True), True),
    (QuantSpec(8, dynamic=True), False), (QuantSpec(8, granularity="position"), False)],
    ids=["static", "dynamic-per-token", "dynamic-per-tensor", "per-position"])
def test_which_quantizers_treat_each_token_on_its_own(spec, per_token):
    site = Site("h", "mamba2")
    site.op = ActivationQuantizer(spec)
    assert site.per_token is per_token


@pytest.mark.parametrize("length, hook", [(45, None), (1, None), (7, lambda h: 1.5 * h)],
                         ids=["chunked", "one-step", "stepwise-with-h-hook"])
def test_scan_gradients_equal_the_reference(length, hook):
    """Both paths record for autograd (the stepwise one serves decoding and a quantized h)."""
    inputs = [t.double().requires_grad_() for t in scan_inputs(2, 2, length, 4, 4, 2, 8)[:5]]
    weights = torch.randn(2, length, 4, 4, dtype=torch.float64)
    (ssd_scan(*inputs, chunk=16, h_hook=hook)[0] * weights).sum().backward()
    fast = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    (ssd_scan_reference(*inputs, h_hook=hook)[0] * weights).sum().backward()
    for got, t in zip(fast, inputs):
        assert torch.allclose(got, t.grad, rtol=1e-8, atol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("overrides", [{}, {"d_ssm": 96}, {"dt_limit_min": 0.01, "dt_limit_max": 0.05}])
def test_reference_scan_model_and_cached_decoding_equal_the_prefill(overrides):
    model = small_lm(seed=3, **overrides)
    ids = fresh_ids(4, 90, vocab=300)
    full = model(ids)
    assert rel_err(use_reference_scan(small_lm(seed=3, **overrides))(ids), full) < 1e-5
    cache = model.new_cache(2)
    pieces = [model(ids[:, :37], cache)] + [model(ids[:, t : t + 1], cache) for t in range(37, 60)]
    pieces.append(model(ids[:, 60:], cache))  # a second prefill from the cached state
    assert rel_err(torch.cat(pieces, 1), full) < 1e-5


@torch.no_grad()
def test_greedy_generation_is_the_argmax_of_full_forwards():
    model = small_lm(seed=5)
    prompt = fresh_ids(6, 20, vocab=300, batch=1)
    new = model.generate(prompt, 8, temperature=0)
    sequence = prompt
    for _ in range(8):
        sequence = torch.cat([sequence, model(sequence)[:, -1:].argmax(-1)], 1)
    assert torch.equal(new, sequence[:, 20:])


@torch.no_grad()
def test_every_site_is_named_documented_and_shaped():
    model = small_lm(seed=7, d_ssm=96)  # 6 heads of 16, 2 groups of d_state 16, an MLP part of 32 channels
    seen = {}
    for name, site in find_sites(model).items():
        site.observers.append(lambda s, t: seen.setdefault(s.name, tuple(t.shape)))
    model(fresh_ids(8, 10, vocab=300))
    mixer_sites = {name.split(".")[-1]: shape for name, shape in seen.items() if ".mixer." in name}
    assert set(mixer_sites) == set(MAMBA2_SITES)
    S, K = 96, 96 + 2 * 2 * 16
    assert mixer_sites == {"z": (2, 10, S), "xBC": (2, 10, K), "x": (2, 10, S), "B": (2, 10, 32), "C": (2, 10, 32),
                           "dt": (2, 10, 6), "h": (2, 10, 6, 16, 16), "y": (2, 10, S), "gate": (2, 10, S),
                           "out_proj_in": (2, 10, 128)}
    assert {"layers.1.norm", "layers.1.residual", "layers.1.out", "embed", "norm_f", "logits"} <= set(seen)
    text = (Path(__file__).parents[1] / "docs" / "runtime.md").read_text().split("## One Mamba-2 block")[1]
    assert all(f"`layers.i.mixer.{kind}`" in text for kind in MAMBA2_SITES)


@torch.no_grad()
def test_site_op_changes_the_function():
    model = small_lm(seed=9)
    ids = fresh_ids(10, 30, vocab=300)
    before = model(ids)
    model.layers[0].mixer.sites["B"].op = torch.nn.Identity()
    assert torch.equal(model(ids), before)
    model.layers[0].mixer.sites["B"].op = Halve()
    assert rel_err(model(ids), before) > 1e-4


class Halve(torch.nn.Module):
    def forward(self, x):
        return x / 2


@pytest.fixture(scope="module", params=list(REAL_CONFIGS))
def hf_model(request):
    return request.param, random_hf(request.param)


@torch.no_grad()
def test_real_configurations_match_transformers(hf_model, tmp_path):
    """Lengths below, at and beyond transformers' chunk (256) and ours (64), in memory and through a directory."""
    size, reference = hf_model
    ours = mambaquant.load(reference)
    assert isinstance(ours, MambaLM) and isinstance(ours.config, Mamba2LMConfig)
    assert ours.config.n_groups == reference.config.n_groups and ours.config.n_heads == reference.config.num_heads
    lengths = (300,) if size == "370m" else (1, 64, 100, 256, 300)
    for length in lengths:
        ids = fresh_ids(length, length, batch=1 if length > 100 else 2)
        assert rel_err(ours(ids), reference(ids).logits) < 1e-4, length
    if size != "370m":
        reference.save_pretrained(tmp_path, max_shard_size="20MB")  # sharded: model.safetensors.index.json
        assert (tmp_path / "model.safetensors.index.json").is_file()
        ids = fresh_ids(1, 100)
        assert rel_err(mambaquant.load(tmp_path)(ids), reference(ids).logits) < 1e-4


@torch.no_grad()
def test_state_spaces_layout_and_bare_files(tmp_path):
    reference = random_hf("codestral-layout", seed=2, num_hidden_layers=2, tie_word_embeddings=True,
                          vocab_size=1000)
    ids = fresh_ids(3, 80, vocab=1000)
    expected = reference(ids).logits
    tensors = {k.replace("embeddings", "embedding"): v.contiguous() for k, v in reference.state_dict().items()
               if k != "lm_head.weight"}
    directory = tmp_path / "state-spaces"
    directory.mkdir()
    torch.save(tensors, directory / "pytorch_model.bin")
    config = dict(d_model=512, n_layer=2, vocab_size=1000, pad_vocab_size_multiple=8, rms_norm=True,
                  ssm_cfg=dict(layer="Mamba2", d_state=128, headdim=64, ngroups=8, chunk_size=256))
    (directory / "config.json").write_text(json.dumps(config))
    assert rel_err(mambaquant.load(directory)(ids), expected) < 1e-4
    save_file(tensors, tmp_path / "bare.safetensors")
    bare = mambaquant.load(tmp_path / "bare.safetensors", n_groups=8)
    assert bare.config.n_groups == 8 and bare.config.tie_embeddings
    assert rel_err(bare(ids), expected) < 1e-4


@torch.no_grad()
def test_saved_model_loads_in_transformers(tmp_path):
    ours = small_lm(seed=11)
    mambaquant.save(ours, tmp_path / "m")
    reference = Mamba2ForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = fresh_ids(12, 70, vocab=300)
    assert rel_err(reference(ids).logits, ours(ids)) < 1e-4
    assert rel_err(mambaquant.load(tmp_path / "m")(ids), ours(ids)) == 0


@torch.no_grad()
def test_mlp_part_round_trips_through_the_state_spaces_layout(tmp_path):
    """d_ssm < d_inner (mamba_ssm's d_mlp) has no place in transformers' config: saved in the state-spaces layout."""
    ours = small_lm(seed=13, d_ssm=96)
    mambaquant.save(ours, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["ssm_cfg"]["d_ssm"] == 96
    ids = fresh_ids(14, 40, vocab=300)
    assert rel_err(mambaquant.load(tmp_path / "m")(ids), ours(ids)) == 0
    mlp_rows = ours.layers[0].mixer.in_proj.weight[:32]
    mlp_rows.mul_(2)  # the MLP part takes part in the function
    assert rel_err(ours(ids), mambaquant.load(tmp_path / "m")(ids)) > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# bad input, through the real CLI: one line naming the problem, exit 2, nothing large allocated first


@pytest.fixture(scope="module")
def tiny_directory(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("mamba2") / "tiny"
    mambaquant.save(small_lm(seed=15, tie_embeddings=True), directory)
    return directory


def variant(tiny_directory: Path, name: str, config: dict | None = None, tensors: dict | None = None) -> Path:
    from safetensors.torch import load_file

    directory = tiny_directory.parent / name
    directory.mkdir()
    base = json.loads((tiny_directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**base, **(config or {})}))
    weights = load_file(tiny_directory / "model.safetensors")
    save_file({**weights, **(tensors or {})}, directory / "model.safetensors")
    return directory


STATE_SPACES_HYBRID = {"d_model": 64, "n_layer": 2, "vocab_size": 300, "attn_layer_idx": [1],
                       "attn_cfg": {"num_heads": 4}, "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16}}


@pytest.mark.parametrize("name,config,tensors,words", [
    ("heads", {"num_heads": 3}, None, "num_heads x head_dim = 3 x 16 is not expand x hidden_size = 128"),
    ("groups", {"n_groups": 3}, None, "n_groups 3 does not divide the 8 heads"),
    ("limit", {"time_step_limit": [0.1, 0.01]}, None, "time_step_limit [0.1, 0.01] is not an interval"),
    ("limit-type", {"time_step_limit": "inf"}, None, "time_step_limit must be a list of numbers"),
    ("norm", {"rms_norm": False}, None, "expected rms_norm true"),
    ("conv", None, {"backbone.layers.1.mixer.conv1d.weight": torch.zeros(192, 1, 3)},
     "weight backbone.layers.1.mixer.conv1d.weight has shape (192, 1, 3), expected (192, 1, 4)"),
    ("A", None, {"backbone.layers.0.mixer.A_log": torch.zeros(4)},
     "weight backbone.layers.0.mixer.A_log has shape (4,), expected (8,)"),
])
def test_inconsistent_mamba2_checkpoints_are_refused(cli, tiny_directory, name, config, tensors, words):
    assert_refused(cli.run("eval", variant(tiny_directory, name, config, tensors)), words)


def test_hybrid_attention_layers_are_refused(cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(STATE_SPACES_HYBRID))
    save_file({"backbone.embedding.weight": torch.zeros(300, 64)}, tmp_path / "model.safetensors")
    assert_refused(cli.run("eval", tmp_path), "hybrid models with attention layers (attn_layer_idx)",
                   "not supported")


def test_bare_file_whose_shapes_do_not_fit_together(cli, tiny_directory, tmp_path):
    from safetensors.torch import load_file

    weights = load_file(tiny_directory / "model.safetensors")
    weights["backbone.layers.0.mixer.norm.weight"] = torch.ones(100)
    save_file(weights, tmp_path / "bare.safetensors")
    assert_refused(cli.run("eval", tmp_path / "bare.safetensors"), "norm.weight has shape (100,), expected heads x "
                   "head_dim channels (8 heads")
    weights = load_file(tiny_directory / "model.safetensors")
    save_file(weights, tmp_path / "good.safetensors")
    with pytest.raises(InputError, match="conv1d.weight has 192 channels, expected 128 .x. \\+ 2 x n_groups x "
                       "d_state .B, C. with n_groups 3"):
        mambaquant.load(tmp_path / "good.safetensors", n_groups=3)
    with pytest.raises(InputError, match="stride apply only to a Vision Mamba checkpoint file, and this is a Mamba-2 "):
        mambaquant.load(tmp_path / "good.safetensors", stride=2)
    assert mambaquant.load(tmp_path / "good.safetensors", n_groups=2).config.d_state == 16


def test_embedded_mamba2_reproduces_its_card_through_the_cli(cli):
    from mambaquant.zoo import card

    result = cli.run("eval", "mamba2-shakespeare", "--json", timeout=600)  # the whole validation split
    assert result.code == 0, result.stderr
    measured = json.loads(result.stdout)
    final = card("mamba2-shakespeare")["final"]
    assert measured["metric"] == final["metric"] == "bits_per_byte"
    assert measured["value"] == pytest.approx(final["value"], abs=1e-4)
    assert final["value"] <= 2.35
    generated = cli.run("generate", "mamba2-shakespeare", "--prompt", "ROMEO:", "--max-new-tokens", "40",
                        "--temperature", "0")
    assert generated.code == 0 and generated.stdout.startswith("ROMEO:") and len(generated.stdout) > 40


@pytest.mark.parametrize("name", ["mamba2-shakespeare", "hybrid-shakespeare"])
def test_the_training_command_without_options_is_the_cards_recipe(name):
    """`python -m mambaquant.zoo.train NAME --out DIR` re-creates the shipped model's recipe."""
    import dataclasses

    from mambaquant.zoo import card
    from mambaquant.zoo.train import RECIPES

    recipe_class, _ = RECIPES[name]
    assert dataclasses.asdict(recipe_class()) == card(name)["recipe"]
