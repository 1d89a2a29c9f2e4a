"""From-scratch Mamba layouts: alxndrTL/mamba.py and johnma2006/mamba-minimal LMs, pinned against plain-PyTorch
re-implementations of each repository's model written here (their module names, so their state dicts are the
repositories' own layout); and `load_state_dict` of any layout into our models."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn

from mambaquant.errors import InputError
from mambaquant.loaders import hf, mamba2, vim
from mambaquant.loaders.layouts import detect_layout, is_alxndrtl_config, load_public_lm, load_state_dict
from mambaquant.loaders.weights import open_checkpoint
from mambaquant.runtime import LMConfig, Mamba2LMConfig, MambaLM, VisionConfig, VisionMamba, init_weights

from .helpers import rel_err

D_MODEL, N_LAYER, VOCAB = 32, 2, 64


class RMSNorm(nn.Module):  # the same in both repositories
    def __init__(self, d_model, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d_model))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MinimalMambaBlock(nn.Module):
    """mamba-minimal model.py MambaBlock: channels-first, conv1d padded by d_conv - 1 and cut, sequential scan."""

    def __init__(self, d_model, d_state=16, expand=2, d_conv=4):
        super().__init__()
        d_in, self.dt_rank = expand * d_model, math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_in, bias=False)
        self.conv1d = nn.Conv1d(d_in, d_in, d_conv, groups=d_in, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_in, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_in)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float().repeat(d_in, 1)))
        self.D = nn.Parameter(torch.ones(d_in))
        self.out_proj = nn.Linear(d_in, d_model, bias=False)

    def forward(self, x):
        (b, length, _), (d_in, n) = x.shape, self.A_log.shape
        x, res = self.in_proj(x).transpose(1, 2).split([d_in, d_in], dim=1)  # (b, d_in, l)
        x = F.silu(self.conv1d(x)[:, :, :length])
        A = -torch.exp(self.A_log.float())
        delta, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, n, n], dim=-1)
        delta = F.softplus(self.dt_proj(delta))  # (b, l, d_in)
        delta_A = torch.exp(torch.einsum("bld,dn->bdln", delta, A))
        delta_B_u = torch.einsum("bld,bln,bdl->bdln", delta, B, x)
        h, ys = torch.zeros(b, d_in, n), []
        for i in range(length):
            h = delta_A[:, :, i] * h + delta_B_u[:, :, i]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, i]))
        y = torch.stack(ys, dim=2) + x * self.D[:, None]
        return self.out_proj((y * F.silu(res)).transpose(1, 2))


class MinimalResidualBlock(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.mixer, self.norm = MinimalMambaBlock(d_model), RMSNorm(d_model)

    def forward(self, x):
        return self.mixer(self.norm(x)) + x


class MinimalMamba(nn.Module):
    """mamba-minimal model.py Mamba: embedding, layers, norm_f, lm_head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D_MODEL)
        self.layers = nn.ModuleList(MinimalResidualBlock(D_MODEL) for _ in range(N_LAYER))
        self.norm_f = RMSNorm(D_MODEL)
        self.lm_head = nn.Linear(D_MODEL, VOCAB, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, input_ids):
        x = self.embedding(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm_f(x))


class PyMambaBlock(nn.Module):
    """mamba.py mambapy/mamba.py MambaBlock (its sequential scan): channels-last, dt = softplus(W delta + bias),
    dt_proj initialised as mamba.py does (uniform weight, bias the inverse softplus of a log-uniform dt)."""

    def __init__(self, c):
        super().__init__()
        self.c, d_in = c, c["expand_factor"] * c["d_model"]
        self.in_proj = nn.Linear(c["d_model"], 2 * d_in, bias=c["bias"])
        self.conv1d = nn.Conv1d(d_in, d_in, c["d_conv"], bias=c["conv_bias"], groups=d_in, padding=c["d_conv"] - 1)
        self.x_proj = nn.Linear(d_in, c["dt_rank"] + 2 * c["d_state"], bias=False)
        self.dt_proj = nn.Linear(c["dt_rank"], d_in, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -c["dt_rank"] ** -0.5, c["dt_rank"] ** -0.5)
        dt = torch.exp(torch.rand(d_in) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, c["d_state"] + 1, dtype=torch.float32).repeat(d_in, 1)))
        self.D = nn.Parameter(torch.ones(d_in))
        self.out_proj = nn.Linear(d_in, c["d_model"], bias=c["bias"])

    def forward(self, x):
        length = x.shape[1]
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv1d(x.transpose(1, 2))[:, :, :length].transpose(1, 2))
        A, n = -torch.exp(self.A_log.float()), self.c["d_state"]
        delta, B, C = torch.split(self.x_proj(x), [self.c["dt_rank"], n, n], dim=-1)
        delta = F.softplus((self.dt_proj.weight @ delta.transpose(1, 2)).transpose(1, 2) + self.dt_proj.bias)
        delta_A = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, ED, N)
        BX = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
        h, hs = torch.zeros(x.shape[0], *A.shape), []
        for t in range(length):
            h = delta_A[:, t] * h + BX[:, t]
            hs.append(h)
        y = (torch.stack(hs, dim=1) @ C.unsqueeze(-1)).squeeze(3) + self.D * x
        return self.out_proj(y * F.silu(z))


class PyResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mixer, self.norm = PyMambaBlock(c), RMSNorm(c["d_model"], c["rms_norm_eps"])

    def forward(self, x):
        return self.mixer(self.norm(x)) + x


class PyMamba(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(PyResidualBlock(c) for _ in range(c["n_layers"]))


class PyLM(nn.Module):
    """mamba.py mambapy/lm.py LM (head untied), or with `tied` mambapy/mamba_lm.py MambaLM."""

    def __init__(self, c, tied):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, c["d_model"], padding_idx=0)
        self.mamba = PyMamba(c)
        self.norm_f = RMSNorm(c["d_model"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["d_model"], VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embedding.weight

    def forward(self, tokens):
        x = self.embedding(tokens)
        for layer in self.mamba.layers:
            x = layer(x)
        return self.lm_head(self.norm_f(x))


PY_CONFIG = {"d_model": D_MODEL, "n_layers": N_LAYER, "dt_rank": 2, "d_state": 16, "expand_factor": 2, "d_conv": 4,
             "bias": False, "conv_bias": True, "rms_norm_eps": 1e-5}


def randomised(model):
    """Linear and embedding weights ~ N(0, 0.02) (dt_proj keeps its own init), norm weights near 1."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and not name.endswith("dt_proj"):
                module.weight.normal_(0, 0.02)
            if isinstance(module, RMSNorm):
                module.weight.add_(0.1 * torch.randn(module.weight.shape))
    return model.eval()


def save(model, path):
    if path.suffix == ".safetensors":
        save_model(model, str(path))  # drops the head of a tied model (safetensors keeps one name per tensor)
    else:
        torch.save(model.state_dict(), path)  # both names of a tied tensor
    return path


def check_same_logits(reference, path, **kwargs):
    ours = load_public_lm(open_checkpoint(path), str(path), **kwargs)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(ids), reference(ids)) < 1e-4
    return ours


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_mamba_minimal(tmp_path, suffix):
    reference = randomised(MinimalMamba())
    path = save(reference, tmp_path / f"model{suffix}")
    assert detect_layout(open_checkpoint(path).infos) == "mamba-minimal"
    model = check_same_logits(reference, path)
    assert model.config.tie_embeddings and model.config.n_layer == N_LAYER and model.config.dt_rank == 2


@pytest.mark.parametrize("suffix,tied", [(".safetensors", False), (".pt", True), (".safetensors", True)])
def test_alxndrtl(tmp_path, suffix, tied):
    reference = randomised(PyLM(PY_CONFIG, tied))
    path = save(reference, tmp_path / f"model{suffix}")
    assert detect_layout(open_checkpoint(path).infos) == "alxndrtl"
    assert check_same_logits(reference, path).config.tie_embeddings == tied


def test_alxndrtl_config(tmp_path):
    """mamba.py's config dict: biases, no conv bias, another state size, dt rank and norm eps."""
    config = dict(PY_CONFIG, d_state=8, dt_rank=3, bias=True, conv_bias=False, rms_norm_eps=1e-3, pscan=True)
    reference = randomised(PyLM(config, tied=False))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("proj.bias") and "dt_proj" not in name:
                p.normal_(0, 0.02)
    path = save(reference, tmp_path / "model.safetensors")
    assert is_alxndrtl_config(config) and not is_alxndrtl_config({"d_model": 32, "n_layer": 2, "vocab_size": 64})
    model = check_same_logits(reference, path, config=config)
    assert (model.config.d_state, model.config.norm_eps, model.config.bias) == (8, 1e-3, True)
    with pytest.raises(InputError, match=r"weight mamba\.layers\.0\.mixer\.A_log has shape \(64, 8\), expected "
                                         r"\(64, 16\)$"):
        load_public_lm(open_checkpoint(path), "m", config=dict(config, d_state=16))
    with pytest.raises(InputError, match="^m config: muP models"):
        load_public_lm(open_checkpoint(path), "m", config=dict(config, mup=True))


def test_alxndrtl_without_norm_weights_is_refused(tmp_path):
    tensors = randomised(PyLM(PY_CONFIG, tied=False)).state_dict()
    del tensors["norm_f.weight"]
    torch.save(tensors, tmp_path / "m.pt")
    with pytest.raises(InputError, match=r"^m: no norm_f\.weight: muP models .* are not supported"):
        load_public_lm(open_checkpoint(tmp_path / "m.pt"), "m")


def test_other_layouts_are_not_detected(small_lm, small_vim):
    assert detect_layout(small_lm.state_dict()) is None
    assert detect_layout(hf.hf_state_dict(small_lm)) is None
    assert detect_layout(vim.vim_state_dict(small_vim)) is None


def renamed(tensors, *rules):
    out = {}
    for name, tensor in tensors.items():
        for pattern, replacement in rules:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor
    return out


def same_outputs(a, b, inputs):
    with torch.no_grad():
        return torch.equal(a(inputs), b(inputs))


IDS = torch.arange(20).reshape(2, 10)


@pytest.mark.parametrize("tied", [True, False])
def test_prefixed_mamba_ssm_names_into_an_lm(tied):
    config = LMConfig(d_model=D_MODEL, n_layer=N_LAYER, d_state=8, vocab_size=VOCAB, tie_embeddings=tied)
    source = init_weights(MambaLM(config), seed=3).eval()
    tensors = renamed(hf.hf_state_dict(source), (r"^backbone\.layers\.", "encoder.layers."))  # mamba_ssm's names
    mapping = {r"backbone\.embeddings\.(.*)": r"embedding.\1", r"backbone\.(norm_f\..*)": r"\1"}
    model = load_state_dict(MambaLM(config), tensors, mapping)
    assert not model.training and same_outputs(model, source, IDS)
    if tied:  # a head equal to the embedding counts once; another one is refused
        tensors["lm_head.weight"] = source.embedding.weight.detach().clone()
        assert same_outputs(load_state_dict(MambaLM(config), tensors, mapping), source, IDS)
        tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
        with pytest.raises(InputError, match=r"^state dict: \S+ and \S+ both load embedding\.weight \(tied to "
                                             r"lm_head\.weight in this model, with other values\)"):
            load_state_dict(MambaLM(config), tensors, mapping)


def test_vim_names_under_another_prefix_with_a_mapping():
    """Vim's bidirectional `_b` names under blocks.N.mamba., the norm beside it; the stem and head mapped."""
    config = VisionConfig(img_size=16, patch_size=4, stride=4, d_model=32, n_layer=2, d_state=8, num_classes=10)
    source = init_weights(VisionMamba(config), seed=4).eval()
    with torch.no_grad():
        for p in source.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape))
    tensors = renamed(vim.vim_state_dict(source), (r"^layers\.(\d+)\.mixer\.", r"blocks.\1.mamba."),
                      (r"^layers\.", "blocks."), (r"^patch_embed\.proj\.", "stem."), (r"^cls_token$", "cls"),
                      (r"^pos_embed$", "pos"), (r"^head\.", "classifier."), (r"^norm_f\.", "final_norm."))
    assert "blocks.1.mamba.A_b_log" in tensors and "blocks.1.norm.weight" in tensors
    mapping = {r"stem\.(.*)": r"patch_embed.proj.\1", "cls": "cls_token", "pos": "pos_embed",
               r"classifier\.(.*)": r"head.\1", r"final_norm\.(.*)": r"norm_f.\1"}
    model = load_state_dict(VisionMamba(config), tensors, mapping)
    images = torch.randn(2, 3, 16, 16)
    assert same_outputs(model, source, images)
    as_function = {"stem.weight": "patch_embed.proj.weight", "stem.bias": "patch_embed.proj.bias", "cls": "cls_token",
                   "pos": "pos_embed", "classifier.weight": "head.weight", "classifier.bias": "head.bias",
                   "final_norm.weight": "norm_f.weight"}.get
    assert same_outputs(load_state_dict(VisionMamba(config), tensors, as_function), source, images)


def test_mamba2_names():
    config = Mamba2LMConfig(d_model=D_MODEL, n_layer=N_LAYER, d_state=16, head_dim=16, vocab_size=VOCAB)
    source = init_weights(MambaLM(config), seed=5).eval()
    tensors = renamed(mamba2.saved_state_dict(source), (r"^backbone\.layers\.(\d+)\.mixer\.", r"net.\1.ssd."),
                      (r"^backbone\.layers\.", "net."))
    model = load_state_dict(MambaLM(config), tensors, {r"backbone\.embeddings\.weight": "embedding.weight",
                                                       r"backbone\.norm_f\.weight": "norm_f.weight"})
    assert same_outputs(model, source, IDS)


def lm_tensors():
    config = LMConfig(d_model=D_MODEL, n_layer=N_LAYER, d_state=8, vocab_size=VOCAB)
    return config, renamed(init_weights(MambaLM(config)).state_dict(), (r"^layers\.(\d+)\.mixer\.ssm\.", r"m.\1.x."),
                           (r"^layers\.(\d+)\.mixer\.", r"m.\1.x."), (r"^layers\.(\d+)\.norm", r"m.\1.norm"))


def test_unmatched_and_missing_in_one_line():
    config, tensors = lm_tensors()
    tensors.update({f"extra.{i}": torch.zeros(1) for i in range(6)})
    del tensors["norm_f.weight"], tensors["m.1.x.D"]
    tensors["m.7.x.A_log"] = tensors["m.0.x.A_log"]
    with pytest.raises(InputError) as error:
        load_state_dict(MambaLM(config), tensors)
    assert str(error.value) == (
        "state dict: 7 tensor(s) match no parameter of the MambaLM: extra.0, extra.1, extra.2, extra.3 ... (3 more); "
        "2 parameter(s) of the MambaLM are missing: layers.1.mixer.ssm.D, norm_f.weight; pass mapping={their name "
        "regex: our name} (or a function) to name them")
    config, tensors = lm_tensors()
    tensors["m.7.x.A_log"] = tensors["m.0.x.A_log"]
    assert load_error(MambaLM(config), tensors).startswith(
        "state dict: 1 tensor(s) match no parameter of the MambaLM: m.7.x.A_log (as layers.7.mixer.ssm.A_log); pass")


def load_error(model, tensors, **kwargs) -> str:
    with pytest.raises(InputError) as error:
        load_state_dict(model, tensors, **kwargs)
    return str(error.value)


def test_strict_false_ignores_unmatched_but_not_missing():
    config, tensors = lm_tensors()
    tensors["extra"] = torch.zeros(3)
    model = load_state_dict(MambaLM(config), tensors, strict=False)
    assert same_outputs(model, init_weights(MambaLM(config)).eval(), IDS)
    del tensors["m.0.x.in_proj.weight"]
    assert load_error(MambaLM(config), tensors, strict=False) == (
        "state dict: 1 parameter(s) of the MambaLM are missing: layers.0.mixer.in_proj.weight; pass mapping={their "
        "name regex: our name} (or a function) to name them")


def test_shape_mismatch_names_the_tensor():
    config, tensors = lm_tensors()
    tensors["m.1.x.x_proj.weight"] = torch.zeros(5, 64)
    assert load_error(MambaLM(config), tensors) == ("state dict: weight m.1.x.x_proj.weight has shape (5, 64), "
                                                    "expected (18, 64)")


def test_bad_mappings_and_prefixes():
    config, tensors = lm_tensors()
    tensors["other.0.mixer.A_log"] = tensors["m.0.x.A_log"]
    assert load_error(MambaLM(config), tensors).startswith(
        "state dict: Mamba modules under 2 different prefixes (m.N.x., other.N.mixer.); expected one")
    assert load_error(MambaLM(config), tensors, mapping={"(": "x"}).startswith("mapping: '(' is not a regular ")
    assert load_error(MambaLM(config), tensors, mapping=lambda name: 3).startswith("mapping('")
    assert load_error(MambaLM(config), tensors, mapping={r"other\.0\.mixer\.A_log": "layers.0.mixer.ssm.A_log"}) == (
        "state dict: m.0.x.A_log and other.0.mixer.A_log both load layers.0.mixer.ssm.A_log; expected one tensor "
        "per parameter")
    assert load_error(nn.Linear(2, 2), tensors).startswith("load_state_dict: expected one of our models")
