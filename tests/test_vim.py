"""Vision Mamba: the official hustvl/Vim state-dict names load, and the forward semantics are pinned against an
independent re-implementation written here from the official code's description."""

import math

import torch
import torch.nn.functional as F

import mambaquant
from mambaquant.loaders.vim import vim_state_dict

from .helpers import rel_err


def official_vim_state_dict(d_model, depth, num_classes=1000, patch=16, num_patches=196, d_state=16, seed=0):
    """Official key names and shapes for a Vim v2 model (hustvl/Vim models_mamba.py), random values."""
    g = torch.Generator().manual_seed(seed)
    E, R = 2 * d_model, math.ceil(d_model / 16)

    def rand(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "patch_embed.proj.weight": rand(d_model, 3, patch, patch),
        "patch_embed.proj.bias": rand(d_model),
        "cls_token": rand(1, 1, d_model),
        "pos_embed": rand(1, num_patches + 1, d_model),
        "norm_f.weight": 1 + rand(d_model, scale=0.1),
        "head.weight": rand(num_classes, d_model),
        "head.bias": rand(num_classes),
    }
    for i in range(depth):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1 + rand(d_model, scale=0.1)
        sd[p + "mixer.in_proj.weight"] = rand(2 * E, d_model)
        sd[p + "mixer.out_proj.weight"] = rand(d_model, E)
        for suffix in ("", "_b"):
            sd[p + f"mixer.conv1d{suffix}.weight"] = rand(E, 1, 4, scale=0.3)
            sd[p + f"mixer.conv1d{suffix}.bias"] = rand(E, scale=0.1)
            sd[p + f"mixer.x_proj{suffix}.weight"] = rand(R + 2 * d_state, E, scale=0.1)
            sd[p + f"mixer.dt_proj{suffix}.weight"] = rand(E, R, scale=R**-0.5)
            sd[p + f"mixer.dt_proj{suffix}.bias"] = torch.log(torch.expm1(torch.rand(E, generator=g) * 0.1 + 1e-3))
        a_log = torch.log(torch.arange(1, d_state + 1.0)).expand(E, d_state) + rand(E, d_state, scale=0.1)
        sd[p + "mixer.A_log"], sd[p + "mixer.A_b_log"] = a_log.clone(), a_log.flip(1).clone()
        sd[p + "mixer.D"], sd[p + "mixer.D_b"] = 1 + rand(E, scale=0.3), 1 + rand(E, scale=0.3)
    return sd


def rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mamba_inner_no_out_proj(xz, conv_w, conv_b, x_proj, dt_proj_w, dt_proj_b, A, D):
    """Channel-first (B, 2E, L) like mamba_inner_fn_no_out_proj: causal conv, SiLU, selective scan, D, gate."""
    x, z = xz.chunk(2, dim=1)
    L = x.shape[-1]
    x = F.silu(F.conv1d(x, conv_w, conv_b, padding=conv_w.shape[-1] - 1, groups=x.shape[1])[..., :L])
    x_dbl = torch.einsum("rd,bdl->blr", x_proj, x)
    R, N = dt_proj_w.shape[1], A.shape[1]
    dt, B, C = x_dbl[..., :R], x_dbl[..., R : R + N], x_dbl[..., R + N :]
    delta = F.softplus(torch.einsum("dr,blr->bdl", dt_proj_w, dt) + dt_proj_b[:, None])
    h = x.new_zeros(x.shape[0], x.shape[1], N)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, t, None, :] * x[:, :, t, None]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=-1) + x * D[:, None]
    return y * F.silu(z)


def reference_vim_forward(sd, images, patch, stride):
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)
    B, M, _ = x.shape
    token_position = M // 2
    x = torch.cat([x[:, :token_position], sd["cls_token"].expand(B, -1, -1), x[:, token_position:]], dim=1)
    x = x + sd["pos_embed"]
    residual = None
    hidden = x
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}."
        residual = hidden if residual is None else residual + hidden
        hidden = rms_norm(residual, sd[p + "norm.weight"])
        xz = (hidden @ sd[p + "mixer.in_proj.weight"].T).transpose(1, 2)
        out = mamba_inner_no_out_proj(
            xz, sd[p + "mixer.conv1d.weight"], sd[p + "mixer.conv1d.bias"], sd[p + "mixer.x_proj.weight"],
            sd[p + "mixer.dt_proj.weight"], sd[p + "mixer.dt_proj.bias"], -torch.exp(sd[p + "mixer.A_log"]),
            sd[p + "mixer.D"],
        )
        out_b = mamba_inner_no_out_proj(
            xz.flip([-1]), sd[p + "mixer.conv1d_b.weight"], sd[p + "mixer.conv1d_b.bias"],
            sd[p + "mixer.x_proj_b.weight"], sd[p + "mixer.dt_proj_b.weight"], sd[p + "mixer.dt_proj_b.bias"],
            -torch.exp(sd[p + "mixer.A_b_log"]), sd[p + "mixer.D_b"],
        )
        hidden = ((out + out_b.flip([-1])).transpose(1, 2) / 2) @ sd[p + "mixer.out_proj.weight"].T
    residual = residual + hidden
    hidden = rms_norm(residual, sd["norm_f.weight"])
    return hidden[:, token_position] @ sd["head.weight"].T + sd["head.bias"]


def test_vim_tiny_official_keys_load(tmp_path):
    sd = official_vim_state_dict(d_model=192, depth=24)
    torch.save({"model": sd}, tmp_path / "vim_t.pth")
    model = mambaquant.load(tmp_path / "vim_t.pth")  # raises on any missing or unexpected key
    c = model.config
    assert (c.d_model, c.n_layer, c.d_state, c.expand, c.dt_rank) == (192, 24, 16, 2, 12)
    assert (c.patch_size, c.stride, c.img_size, c.num_classes, c.norm, c.bidirectional) == (16, 16, 224, 1000, "rms", "separate")
    assert set(vim_state_dict(model)) == set(sd)
    for name, tensor in vim_state_dict(model).items():
        assert torch.equal(tensor, sd[name]), name


def test_vim_plus_stride_is_inferred(tmp_path):
    sd = official_vim_state_dict(d_model=48, depth=1, num_patches=27 * 27)
    torch.save({"model": sd}, tmp_path / "vim_plus.pth")
    c = mambaquant.load(tmp_path / "vim_plus.pth").config
    assert (c.stride, c.img_size) == (8, 224)
    c = mambaquant.load(tmp_path / "vim_plus.pth", stride=16, img_size=432).config
    assert (c.stride, c.img_size) == (16, 432)


@torch.no_grad()
def test_vim_forward_matches_independent_reference(tmp_path):
    sd = official_vim_state_dict(d_model=32, depth=3, num_classes=10, patch=8, num_patches=16, d_state=8, seed=1)
    torch.save({"model": sd}, tmp_path / "small.pth")
    model = mambaquant.load(tmp_path / "small.pth")
    assert (model.config.img_size, model.config.stride) == (32, 8)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    expected = reference_vim_forward(sd, images, patch=8, stride=8)
    assert rel_err(model(images), expected) < 1e-5
    # the reversed branch and the middle class token matter: breaking either changes the output
    model.layers[0].mixer.ssm_b.D.data += 1.0
    assert rel_err(model(images), expected) > 1e-3


def test_vim_directory_round_trip(small_vim, tmp_path):
    mambaquant.save(small_vim, tmp_path / "vim")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(mambaquant.load(tmp_path / "vim")(images), small_vim(images))
