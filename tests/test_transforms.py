"""Every function-preserving transform leaves a full-precision model's outputs unchanged (within 1e-4 relative)
on fresh random inputs, on random-initialised models of the mamba-130m (HF layout) and Vim-T configurations."""

import copy

import pytest
import torch

from mambaquant.runtime import LMConfig, MambaLM, VisionConfig, VisionMamba, find_sites, init_weights
from mambaquant.transforms.hadamard import hadamard
from mambaquant.transforms.klt import AbsMaxObserver, CovarianceObserver, klt_hadamard
from mambaquant.transforms.rotation import (
    Rotate,
    branches,
    fuse_norms,
    random_hadamard,
    rotate_dt_path,
    rotate_linear_input,
    rotate_residual,
    rotate_state,
)
from mambaquant.transforms.smoothing import (
    smooth_conv_input,
    smooth_dt_input,
    smooth_gate,
    smooth_norm_output,
    smooth_state,
    smoothing_scales,
)

from .helpers import rel_err


def perturb_norms(model, seed):
    """Trained models have non-unit norm scales and non-trivial D; random ones do not: make them so."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight")):
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g))
            if name.endswith(".D"):
                p.copy_(1 + torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def lm_130m():
    model = MambaLM(LMConfig(d_model=768, n_layer=24, vocab_size=50280))
    return perturb_norms(init_weights(model, seed=0), seed=1).eval()


@pytest.fixture(scope="module")
def vim_t():
    model = VisionMamba(VisionConfig(d_model=192, n_layer=24, img_size=224, patch_size=16, stride=16))
    return perturb_norms(init_weights(model, seed=0), seed=2).eval()


def fresh_input(model, seed):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, VisionMamba):
        return torch.randn(2, 3, 224, 224, generator=g)
    return torch.randint(0, model.config.vocab_size, (2, 40), generator=g)


def assert_same_function(original, transformed, seed=100):
    with torch.no_grad():
        x = fresh_input(original, seed)
        assert rel_err(transformed(x), original(x)) < 1e-4


def collect(model, seed, *site_names_and_observers):
    """Run the model once on a calibration input with observers attached at the named sites."""
    sites = find_sites(model)
    for name, observer in site_names_and_observers:
        sites[name].observers.append(observer)
    with torch.no_grad():
        model(fresh_input(model, seed))
    for name, observer in site_names_and_observers:
        sites[name].observers.remove(observer)


@pytest.fixture(params=["lm", "vim"])
def model(request, lm_130m, vim_t):
    return lm_130m if request.param == "lm" else vim_t


def test_norm_fusion(model):
    assert_same_function(model, fuse_norms(copy.deepcopy(model)))


def test_residual_rotation_hadamard_and_klt(model):
    fused = fuse_norms(copy.deepcopy(model))
    D = model.config.d_model
    assert_same_function(model, rotate_residual(copy.deepcopy(fused), random_hadamard(D, seed=3)))
    observer = CovarianceObserver()
    collect(fused, 1, ("layers.0.norm", observer))
    assert_same_function(model, rotate_residual(fused, klt_hadamard(observer.covariance())))


def test_dt_path_and_state_rotations(model):
    rotated = copy.deepcopy(model)
    ssms = [(i, ssm) for i, layer in enumerate(rotated.layers) for ssm in branches(layer.mixer)]
    observers = {ssm.sites["dt_low"].name: CovarianceObserver() for _, ssm in ssms}
    collect(rotated, 1, *observers.items())  # transforms keep each block's function, so one pass serves all
    for i, ssm in ssms:
        rotate_dt_path(ssm, klt_hadamard(observers[ssm.sites["dt_low"].name].covariance()))  # one K per site
        rotate_state(ssm, random_hadamard(ssm.d_state, seed=i))
    assert_same_function(model, rotated)


def test_online_hadamards(model):
    rotated = copy.deepcopy(model)
    for layer in rotated.layers:
        mixer = layer.mixer
        rotate_linear_input(mixer.sites["out_proj_in"], mixer.out_proj, Rotate(mixer.out_proj.in_features))
        for ssm in branches(mixer):
            rotate_linear_input(ssm.sites["x_proj_in"], ssm.x_proj, Rotate(ssm.x_proj.in_features))
    assert_same_function(model, rotated)


def test_smoothing_everywhere_including_smooth_fused_rotation(model):
    smoothed = copy.deepcopy(model)
    names = [layer.sites["norm"].name for layer in smoothed.layers]
    names += [layer.mixer.sites[kind].name for layer in smoothed.layers for kind in ("out_proj_in", "x")]
    names += [ssm.sites[kind].name for layer in smoothed.layers for ssm in branches(layer.mixer) for kind in ("dt_low", "C")]
    absmax = {name: AbsMaxObserver() for name in names}
    collect(smoothed, 1, *absmax.items())
    for layer in smoothed.layers:
        mixer, ssms = layer.mixer, branches(layer.mixer)
        smooth_norm_output(layer.norm, [mixer.in_proj],
                           smoothing_scales(absmax[layer.sites["norm"].name].absmax, mixer.in_proj.weight),
                           layer.sites["norm"])
        smooth_conv_input(mixer, ssms, smoothing_scales(absmax[mixer.sites["x"].name].absmax, None))
        smooth_gate(mixer, smoothing_scales(absmax[mixer.sites["out_proj_in"].name].absmax, mixer.out_proj.weight))
        rotate_linear_input(mixer.sites["out_proj_in"], mixer.out_proj, Rotate(mixer.out_proj.in_features))
        for ssm in ssms:
            smooth_dt_input(ssm, smoothing_scales(absmax[ssm.sites["dt_low"].name].absmax, ssm.dt_proj.weight))
            smooth_state(ssm, 1.0 / smoothing_scales(absmax[ssm.sites["C"].name].absmax, None))
    assert_same_function(model, smoothed)


def test_klt_equalises_channel_variances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 48, generator=g) * torch.logspace(-1, 1, 48)  # very unequal channel variances
    x = x @ torch.linalg.qr(torch.randn(48, 48, generator=g))[0]  # and correlated
    observer = CovarianceObserver()
    observer(None, x)
    variances_klt = (x @ klt_hadamard(observer.covariance())).var(0)
    variances_h = (x @ hadamard(48)).var(0)
    assert variances_klt.max() / variances_klt.min() < 1.3
    assert variances_h.max() / variances_h.min() > 2 * variances_klt.max() / variances_klt.min()
