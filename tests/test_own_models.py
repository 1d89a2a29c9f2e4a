"""Your own Mamba (docs/own-models.md): models composed from ModelConfig fields. Three variants written as public
from-scratch code would write them (plain-PyTorch reference forwards here, their own parameter names), rebuilt
with the public API alone, equal to the reference, quantized with every method, saved and reloaded exactly; every
method keeps the function of every composition at 16 bits (a hypothesis test over the variant space); the docs'
examples run as written."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mambaquant
from mambaquant.errors import InputError
from mambaquant.methods import METHODS
from mambaquant.methods.config import MAMBA2_ONLY_METHODS
from mambaquant.runtime import CenteredRMSNorm, ModelConfig, RMSNorm, find_sites
from mambaquant.runtime.config import CHOICES, model_config_problem

from .helpers import rel_err

MAMBA1_METHODS = [m for m in METHODS if m not in MAMBA2_ONLY_METHODS and m != "fp"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "own-models.md"


def normal_(generator, *shape):
    return torch.randn(*shape, generator=generator) * 0.02


def mamba_ssm_weights(generator, prefix, d_model, d_state=8, d_conv=4, backward=False) -> dict:
    """A mamba_ssm `Mamba` module's parameters (Vim's `_b` branch too), Mamba's initialisation, std 0.02."""
    E, R = 2 * d_model, math.ceil(d_model / 16)
    p = {f"{prefix}in_proj.weight": normal_(generator, 2 * E, d_model),
         f"{prefix}out_proj.weight": normal_(generator, d_model, E)}
    for b in ("", "_b") if backward else ("",):
        p[f"{prefix}conv1d{b}.weight"] = (torch.rand(E, 1, d_conv, generator=generator) - 0.5) / math.sqrt(d_conv)
        p[f"{prefix}conv1d{b}.bias"] = torch.zeros(E)
        p[f"{prefix}x_proj{b}.weight"] = normal_(generator, R + 2 * d_state, E)
        p[f"{prefix}dt_proj{b}.weight"] = (torch.rand(E, R, generator=generator) * 2 - 1) * R**-0.5
        dt = torch.exp(torch.rand(E, generator=generator) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        p[f"{prefix}dt_proj{b}.bias"] = dt + torch.log(-torch.expm1(-dt))
        p[f"{prefix}A{b}_log" if b else f"{prefix}A_log"] = torch.log(torch.arange(1, d_state + 1.0)).repeat(E, 1)
        p[f"{prefix}D{b}"] = torch.ones(E)
    return p


def reference_direction(p, prefix, b, x):
    """One scan direction of mamba_ssm's Mamba: causal conv1d, SiLU, x_proj, softplus dt, sequential scan, D."""
    weight = p[f"{prefix}conv1d{b}.weight"]
    length, E = x.shape[1], weight.shape[0]
    u = F.silu(F.conv1d(x.transpose(1, 2), weight, p[f"{prefix}conv1d{b}.bias"], padding=weight.shape[-1] - 1,
                        groups=E)[..., :length]).transpose(1, 2)
    A = -torch.exp(p[f"{prefix}A{b}_log" if b else f"{prefix}A_log"])
    R = p[f"{prefix}dt_proj{b}.weight"].shape[1]
    dt, B, C = F.linear(u, p[f"{prefix}x_proj{b}.weight"]).split([R, A.shape[1], A.shape[1]], dim=-1)
    dt = F.softplus(F.linear(dt, p[f"{prefix}dt_proj{b}.weight"], p[f"{prefix}dt_proj{b}.bias"]))
    h, ys = torch.zeros(x.shape[0], E, A.shape[1]), []
    for t in range(length):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None]
        ys.append((h * C[:, t, None]).sum(-1))
    return torch.stack(ys, dim=1) + u * p[f"{prefix}D{b}"]


def reference_mamba(p, prefix, x, backward=False):
    """mamba_ssm's Mamba (Vim's bimamba v2 with `backward`: the reversed sequence through the `_b` branch, the two
    directions averaged) -> out_proj(y * SiLU(z))."""
    xi, z = F.linear(x, p[f"{prefix}in_proj.weight"]).chunk(2, dim=-1)
    y = reference_direction(p, prefix, "", xi)
    if backward:
        y = (y + reference_direction(p, prefix, "_b", xi.flip(1)).flip(1)) / 2
    return F.linear(y * F.silu(z), p[f"{prefix}out_proj.weight"])


def rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# Three variants as public code writes them: (config, their state dict, mapping of their other names, reference
# forward, inputs)


def vision_without_norms(generator):
    """A bidirectional Vision Mamba without block norms, position embedding, no class token, mean pooling."""
    D, L = 32, 2
    p = {"patch_embed.proj.weight": normal_(generator, D, 3, 4, 4), "patch_embed.proj.bias": torch.zeros(D),
         "pos_embed": normal_(generator, 1, 16, D), "norm_f.weight": 1 + normal_(generator, D),
         "head.weight": normal_(generator, 10, D), "head.bias": torch.zeros(10)}
    for i in range(L):
        p.update(mamba_ssm_weights(generator, f"layers.{i}.mixer.", D, backward=True))

    def reference(images):
        h = F.conv2d(images, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=4)
        h = h.flatten(2).transpose(1, 2) + p["pos_embed"]
        for i in range(L):
            h = h + reference_mamba(p, f"layers.{i}.mixer.", h, backward=True)
        return F.linear(rms(h, p["norm_f.weight"]).mean(1), p["head.weight"], p["head.bias"])

    config = ModelConfig(stem="patch", img_size=16, patch_size=4, stride=4, in_chans=3, cls_token="none",
                         pos_embed=True, norm="none", final_norm="rms", bidirectional="separate", pooling="mean",
                         d_model=D, n_layer=L, d_state=8, num_classes=10, bias=False)
    return config, p, None, reference, lambda n: torch.randn(n, 3, 16, 16, generator=generator)


def series_without_residuals(generator):
    """A 1-D time-series classifier: a linear per time step, RMSNorm blocks without residual connections, mean
    pooling, an MLP head (their names: embed, encoder.blocks.N.{norm,mamba}, encoder.norm, classifier.0/2)."""
    D, L, H = 32, 2, 24
    p = {"embed.weight": normal_(generator, D, 3), "embed.bias": normal_(generator, D),
         "encoder.norm.weight": 1 + normal_(generator, D), "classifier.0.weight": normal_(generator, H, D),
         "classifier.0.bias": normal_(generator, H), "classifier.2.weight": normal_(generator, 5, H),
         "classifier.2.bias": normal_(generator, 5)}
    for i in range(L):
        p[f"encoder.blocks.{i}.norm.weight"] = 1 + normal_(generator, D)
        p.update(mamba_ssm_weights(generator, f"encoder.blocks.{i}.mamba.", D))

    def reference(series):
        h = F.linear(series, p["embed.weight"], p["embed.bias"])
        for i in range(L):
            h = reference_mamba(p, f"encoder.blocks.{i}.mamba.", rms(h, p[f"encoder.blocks.{i}.norm.weight"]))
        h = rms(h, p["encoder.norm.weight"]).mean(1)
        hidden = F.gelu(F.linear(h, p["classifier.0.weight"], p["classifier.0.bias"]))
        return F.linear(hidden, p["classifier.2.weight"], p["classifier.2.bias"])

    config = ModelConfig(stem="linear", in_features=3, residual=False, pooling="mean", head="mlp", head_hidden=H,
                         head_act="gelu", d_model=D, n_layer=L, d_state=8, num_classes=5)
    mapping = {r"embed\.(\w+)": r"input_proj.\1", r"encoder\.norm\.weight": "norm_f.weight",
               r"classifier\.0\.(\w+)": r"head.fc1.\1", r"classifier\.2\.(\w+)": r"head.fc2.\1"}
    return config, p, mapping, reference, lambda n: torch.randn(n, 40, 3, generator=generator)


def single_token_mnist(generator):
    """An MNIST classifier that reads the whole image as one token: flatten, a linear, residual RMSNorm blocks
    (mamba_ssm's Block names under backbone.), a final norm, a linear head on that token."""
    D, L = 32, 2
    p = {"proj.weight": normal_(generator, D, 784), "proj.bias": torch.zeros(D),
         "backbone.norm_f.weight": 1 + normal_(generator, D), "fc.weight": normal_(generator, 10, D),
         "fc.bias": torch.zeros(10)}
    for i in range(L):
        p[f"backbone.layers.{i}.norm.weight"] = 1 + normal_(generator, D)
        p.update(mamba_ssm_weights(generator, f"backbone.layers.{i}.mixer.", D))

    def reference(images):
        h = F.linear(images.flatten(1), p["proj.weight"], p["proj.bias"])[:, None]
        for i in range(L):
            h = h + reference_mamba(p, f"backbone.layers.{i}.mixer.", rms(h, p[f"backbone.layers.{i}.norm.weight"]))
        return F.linear(rms(h, p["backbone.norm_f.weight"])[:, -1], p["fc.weight"], p["fc.bias"])

    config = ModelConfig(stem="flatten", in_features=784, pooling="last", d_model=D, n_layer=L, d_state=8,
                         num_classes=10)
    mapping = {r"proj\.(\w+)": r"input_proj.\1", r"backbone\.norm_f\.weight": "norm_f.weight",
               r"fc\.(\w+)": r"head.\1"}
    return config, p, mapping, reference, lambda n: torch.rand(n, 1, 28, 28, generator=generator)


VARIANTS = {"vision-without-norms": vision_without_norms, "series-without-residuals": series_without_residuals,
            "single-token-mnist": single_token_mnist}


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    generator = torch.Generator().manual_seed(0)
    config, weights, mapping, reference, inputs = VARIANTS[request.param](generator)
    model = mambaquant.load_state_dict(mambaquant.build(config), weights, mapping=mapping)
    return model, reference, inputs


@torch.no_grad()
def test_a_public_variant_rebuilt_equals_its_reference(variant):
    model, reference, inputs = variant
    x = inputs(4)
    assert rel_err(model(x), reference(x)) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method", MAMBA1_METHODS)
def test_every_method_quantizes_saves_and_reloads_a_variant_exactly(variant, method, tmp_path):
    model, _, inputs = variant
    calibration, x = inputs(16), inputs(6)
    kept = mambaquant.quantize(model, method=method, w_bits=16, a_bits=16, calib=calibration)
    assert rel_err(kept(x), model(x)) < 1e-4
    quantized = mambaquant.quantize(model, method=method, w_bits=4, a_bits=8, calib=calibration)
    reloaded = mambaquant.load(mambaquant.save(quantized, tmp_path / method))
    assert torch.equal(reloaded(x), quantized(x))
    assert rel_err(quantized(x), model(x)) < 0.5  # quantized, and still the same model


@torch.no_grad()
def test_a_full_precision_variant_saves_and_reloads_without_user_classes(variant, tmp_path):
    model, _, inputs = variant
    x = inputs(3)
    reloaded = mambaquant.load(mambaquant.save(model, tmp_path / "fp"))
    assert type(reloaded) is type(model) and reloaded.config == model.config
    assert torch.equal(reloaded(x), model(x))


def test_a_variant_is_analysed_and_compared_on_its_own_data(variant, tmp_path):
    from mambaquant.analysis import AnalysisConfig, analyze
    from mambaquant.compare import USER_TASK, compare

    model, _, inputs = variant
    calibration, x = inputs(8), inputs(12)
    with torch.no_grad():
        labels = model(x).argmax(-1)  # labels the FP model gets right: top-1 100 % at full precision
    rows = compare(model, methods=("fp", "rtn", "mambaquant"), bits=("w8a8",), granularities=("tensor",),
                   calib=calibration, eval_data=(x, labels))
    by_method = {row.method: row for row in rows if row.task == USER_TASK}
    assert set(by_method) == {"fp", "rtn", "mambaquant"}
    assert by_method["fp"].value == 100.0 and "user data" in by_method["fp"].protocol
    assert all(0 <= row.value <= 100 for row in by_method.values())
    out = tmp_path / "analysis"
    analyze(model, out, AnalysisConfig(calib=calibration, calib_samples=8, methods=("rtn",)))
    assert (out / "index.html").is_file()
    sites = json.loads((out / "stats.json").read_text())["sites"]
    assert "tokens" in sites["layers.0.mixer.out_proj_in"]  # token-wise outliers beside the channel statistics


# Every combination keeps the function under every method at 16 bits

def draw_inputs(config, n, generator):
    if config.stem == "embedding":
        return torch.randint(0, config.vocab_size, (n, config.seq_len or 10), generator=generator)
    if config.stem == "patch":
        return torch.randn(n, config.in_chans, config.img_size, config.img_size, generator=generator)
    if config.stem == "flatten":
        return torch.randn(n, config.in_features, generator=generator)
    return torch.randn(n, config.seq_len or 10, config.in_features, generator=generator)


def consistent(fields: dict) -> bool:
    return model_config_problem({**ModelConfig().to_dict(), **fields}) is None


VARIANT_SPACE = st.fixed_dictionaries({
    name: st.sampled_from(CHOICES[name]) for name in
    ("stem", "cls_token", "norm", "final_norm", "bidirectional", "pooling", "head", "head_act")
} | {"pos_embed": st.booleans(), "residual": st.booleans(), "divide_out": st.booleans(),
     "conv": st.sampled_from(CHOICES["conv"])}).filter(consistent)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(fields=VARIANT_SPACE, seed=st.integers(0, 2**16))
@torch.no_grad()
def test_every_method_keeps_every_composition_at_16_bits(fields, seed):
    config = ModelConfig(d_model=16, n_layer=2, d_state=4, num_classes=3, vocab_size=40, img_size=8, patch_size=4,
                         stride=2, in_features=3, seq_len=7 if fields["pos_embed"] else 0, **fields)
    model = mambaquant.build(config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():  # non-trivial norms (some scales negative), so that their fusion is exercised
        if isinstance(module, (RMSNorm, CenteredRMSNorm, torch.nn.LayerNorm)):
            module.weight.add_(3 * torch.rand(module.weight.shape, generator=generator) - 1.5)
        if isinstance(module, torch.nn.LayerNorm):
            module.bias.add_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    calibration, x = draw_inputs(config, 8, generator), draw_inputs(config, 4, generator)
    reference = model(x)
    for method in MAMBA1_METHODS:
        kept = mambaquant.quantize(model, method=method, w_bits=16, a_bits=16, calib=calibration, calib_samples=8)
        assert rel_err(kept(x), reference) < 1e-4, method


# A final LayerNorm over blocks of another kind (issue 34, item 4)

@torch.no_grad()
@pytest.mark.parametrize("fields", [
    {"norm": "none", "residual": False, "pooling": "mean", "head": "mlp"},  # issue 34's time-series classifier
    {"norm": "rms", "residual": True, "pooling": "max", "head": "linear"},
    {"norm": "none", "residual": True, "pooling": "none", "head": "linear", "bidirectional": "separate"},
])
def test_every_method_keeps_a_final_layer_norm_over_other_blocks(fields, tmp_path):
    config = ModelConfig(stem="linear", in_features=2, final_norm="layer", d_model=16, n_layer=2, d_state=4,
                         num_classes=3, **fields)
    model = mambaquant.build(config, seed=3)
    generator = torch.Generator().manual_seed(3)
    assert isinstance(model.norm_f, torch.nn.LayerNorm)
    model.norm_f.weight.add_(3 * torch.rand(16, generator=generator) - 1.5)  # negative scales too
    model.norm_f.bias.add_(torch.rand(16, generator=generator) - 0.5)
    model.norm_f.bias.add_(2.0)  # a bias with a large mean: only a LayerNorm's own centring keeps it out of x
    for layer in model.layers:
        if isinstance(layer.norm, RMSNorm):
            layer.norm.weight.add_(torch.rand(16, generator=generator) - 0.5)
    with torch.no_grad():  # a stream with a large mean, which the final LayerNorm removes and the blocks read
        model.input_proj.bias.add_(3.0)
    calibration, x = torch.randn(8, 12, 2, generator=generator), torch.randn(4, 12, 2, generator=generator)
    reference = model(x)
    for method in MAMBA1_METHODS:
        kept = mambaquant.quantize(model, method=method, w_bits=16, a_bits=16, calib=calibration)
        assert rel_err(kept(x), reference) < 1e-4, method
        assert kept.config.final_norm == ("centered" if method in ("quarot", "mambaquant", "mambaquant+") else "layer")
        quantized = mambaquant.quantize(model, method=method, w_bits=4, a_bits=8, calib=calibration)
        reloaded = mambaquant.load(mambaquant.save(quantized, tmp_path / method))
        assert type(reloaded.norm_f) is type(quantized.norm_f)
        assert torch.equal(reloaded(x), quantized(x)), method
        assert rel_err(quantized(x), reference) < 0.5, method


def test_a_centered_rms_norm_is_a_layer_norm_until_it_turns_with_its_input():
    generator = torch.Generator().manual_seed(0)
    x = 3 + torch.randn(5, 16, generator=generator)
    norm = CenteredRMSNorm(16, eps=1e-5)
    layer_norm = torch.nn.LayerNorm(16, eps=1e-5, elementwise_affine=False)
    assert rel_err(norm(x), layer_norm(x)) < 1e-6
    M = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0]
    with torch.no_grad():
        norm.direction.copy_(norm.direction @ M)
    assert rel_err(norm(x @ M), layer_norm(x) @ M) < 1e-5


# The docs run as written; saving refuses what load could not rebuild; find_sites is in forward order

def test_the_docs_examples_run_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), {"__name__": "own_models_example"})


def test_save_refuses_what_load_could_not_rebuild(tmp_path):
    model = mambaquant.build({"stem": "linear", "in_features": 2, "pooling": "mean", "d_model": 16, "n_layer": 1})

    class MyModel(type(model)):
        pass

    subclassed = MyModel(model.config)
    with pytest.raises(InputError, match="not subclasses"):
        mambaquant.save(subclassed, tmp_path / "a")
    model.head = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.Tanh(), torch.nn.Linear(4, 10))
    with pytest.raises(InputError, match="parameters differ from what its config builds"):
        mambaquant.save(model, tmp_path / "b")

    class Head(torch.nn.Linear):
        pass

    model.head = Head(16, 10)
    with pytest.raises(InputError, match="its module head is a Head"):
        mambaquant.save(model, tmp_path / "c")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fields, problem", [
    ({"pooling": "cls"}, "needs a class token"),
    ({"pos_embed": True, "stem": "linear"}, "set seq_len"),
    ({"norm": "layer", "final_norm": "none"}, "LayerNorm must be every reader"),
    ({"pooling": "avg"}, "pooling"),
    ({"architecture": "transformer"}, "unknown architecture"),
])
def test_inconsistent_compositions_are_one_line(fields, problem):
    with pytest.raises(InputError, match=problem):
        mambaquant.build(fields)


def test_build_refuses_a_block_config():
    from mambaquant.runtime import MambaConfig

    with pytest.raises(InputError, match="describes blocks, not a model"):
        mambaquant.build(MambaConfig(d_model=16, n_layer=1))


@torch.no_grad()
def test_find_sites_lists_an_mlp_headed_model_in_forward_order():
    model = mambaquant.build({"stem": "linear", "in_features": 2, "pooling": "max", "head": "mlp",
                              "bidirectional": "shared-conv", "d_model": 16, "n_layer": 2})
    seen = []
    sites = find_sites(model)
    for site in sites.values():
        site.observers.append(lambda s, x: seen.append(s.name) if s.name not in seen else None)
    model(torch.randn(2, 5, 2))
    assert seen == list(sites)
    assert list(sites)[0] == "embed" and list(sites)[-3:] == ["norm_f", "head.hidden", "logits"]
