"""MambaQuant (Xu et al., ICLR 2025): a KLT-enhanced rotation of the residual stream, then per block the
smooth-fused rotation at out_proj, smoothing at the conv1d and dt_proj inputs and at h*C, a KLT-enhanced rotation
of the dt path and Hadamards at the x_proj input and on the state dimension. Its weights are rounded by GPTQ
(`WEIGHT_ROUNDING`), its granularity is "auto" by default, and h gets a percentile range (`PERCENTILE_SITES`).

On a Mamba-2 block: the smooth-fused rotation at out_proj (the smoothing in the gated norm's weight, exact, then
the online Hadamard), smoothing at the conv1d input (x B C), C.h smoothing per (group, state channel) and a
Hadamard on the state dimension, both online at B, C and h (C leaves the conv through a SiLU: no weight absorbs
them). Mamba-2 has no dt_proj or x_proj, so the dt-path rotation and the x_proj Hadamard have no place there."""

import torch

from ..transforms.klt import AbsMaxObserver, CovarianceObserver, klt_hadamard
from ..transforms.rotation import (Rotate, branches, fuse_norms, random_hadamard, rotate_dt_path,
                                   rotate_linear_input, rotate_out_proj_input, rotate_residual, rotate_state,
                                   rotate_state_mamba2)
from ..transforms.smoothing import (smooth_conv_input, smooth_conv_input_mamba2, smooth_dt_input, smooth_gate,
                                    smooth_gated_norm, smooth_state, smooth_state_mamba2, smoothing_scales,
                                    state_smoothing_scales)
from .config import QuantConfig, QuantReport
from .quarot import per_layer_lines, quarot_attention, quarot_mlp, quarot_moe
from .smoothquant import conv_weight_columns, smooth_mlps, smoothquant_attention
from .stages import Runner, block_runner, by_layer_kind, fused_offline, held, no_op


def mambaquant_model(model, blocks, batches, config: QuantConfig, report: QuantReport) -> None:
    """KLT-enhanced rotation of the residual stream: it is shared by every block, so it gets one rotation, from the
    covariance of all in_proj inputs pooled, gathered in one full-precision pass over the blocks (block by block,
    never the head: for an LM its output is the largest tensor of the forward)."""
    fuse_norms(model, blocks.edit, untie=not config.online_transforms)
    residual = CovarianceObserver()  # every block's input: whatever reads the stream reads it there
    with torch.no_grad():
        hidden = embedded = held([model.embed(batch) for batch in batches], config.calib_dtype)
    for index in range(len(blocks)):
        layer = blocks.load(index)
        hidden = held(block_runner(layer, hidden, embedded).outputs({layer.sites["norm"]: residual}),
                      config.calib_dtype)
        blocks.release(index)
    rotate_residual(model, klt_hadamard(residual.covariance()), blocks.edit)
    report.transforms.append("norm fusion; KLT-enhanced rotation of the residual stream (pooled covariance of every "
                             "block's input); per layer: " + per_layer_lines(PER_LAYER, model, config, VLLM)
                             + ("" if config.smooth else "; smoothing off (smooth false): every smoothing named here "
                                "left out, the rotations alone"))


PER_LAYER = {  # what mambaquant does in each kind of layer: (with online transforms, without)
    "mamba1": ("smooth-fused rotation at out_proj (S-SiLU smoothing + online Hadamard), online Hadamard at x_proj "
               "input, conv1d and dt_proj input smoothing, KLT-enhanced rotation of the dt path (its own covariance), "
               "h*C smoothing per state channel and Hadamard on the state dimension",
               "conv1d and dt_proj input smoothing, KLT-enhanced rotation of the dt path (its own covariance), h*C "
               "smoothing per state channel (in x_proj's B and C rows)"),
    "mamba2": ("smooth-fused rotation at out_proj (gated-norm smoothing + online Hadamard), conv1d input smoothing, "
               "C.h smoothing per group and state channel and Hadamard on the state dimension (online at B, C and h)",
               "gated-norm smoothing at out_proj input, conv1d input smoothing"),
    "attention": ("smooth-fused rotation at o_proj (smoothing in v_proj's rows per key/value head, then a randomised "
                  "Hadamard per value head, offline in v_proj and o_proj)",) * 2,
    "mlp": ("smooth-fused rotation at down_proj (smoothing in up_proj's rows + online Hadamard)",
            "smoothing at down_proj input (in up_proj's rows)"),
    "moe": ("smooth-fused rotation at each expert's down_proj (smoothing in up_proj's rows + online Hadamard), online "
            "Hadamard at the latent fc2's input", "smoothing at each expert's down_proj input (in up_proj's rows)"),
}


VLLM = {"mamba2": "smooth-fused rotation at out_proj (gated-norm smoothing + online Hadamard), conv1d input smoothing",
        "mlp": "smooth-fused rotation at down_proj (smoothing in up_proj's rows + online Hadamard)"}


class GroupStateAbsMax:
    """Largest |h| per (group, state channel) of a Mamba-2 state site (b, T, H, P, N), the heads of each group
    pooled: the C.h smoothing's per-group h range."""

    def __init__(self, n_groups: int):
        self.n_groups, self.absmax = n_groups, None

    @torch.no_grad()
    def __call__(self, site, h: torch.Tensor) -> None:
        steps = h.detach().flatten(0, 1)  # a reduction over the leading dimensions runs 6-12x faster than over
        per_head = torch.maximum(steps.amax(0), -steps.amin(0)).amax(1).float()  # (0, 1, 3) at once: (H, N)
        value = per_head.unflatten(0, (self.n_groups, -1)).amax(1).flatten()
        self.absmax = value if self.absmax is None else torch.maximum(self.absmax, value)


def mambaquant_mamba2(layer, mixer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    sites = mixer.sites
    absmax = {sites[kind]: AbsMaxObserver() for kind in ("out_proj_in", "xBC", "C")}
    absmax[sites["h"]] = GroupStateAbsMax(mixer.config.n_groups)
    if config.smooth:
        runner.observe(absmax)
    if config.smooth:
        smooth_gated_norm(mixer, smoothing_scales(absmax[sites["out_proj_in"]].absmax, mixer.out_proj.weight,
                                                  config.alpha))
        smooth_conv_input_mamba2(mixer, smoothing_scales(absmax[sites["xBC"]].absmax, conv_weight_columns(mixer),
                                                         config.alpha))
    if config.online_input_hadamards:
        rotate_out_proj_input(mixer)
    if not config.online_transforms:
        return
    if config.smooth:
        smooth_state_mamba2(mixer, state_smoothing_scales(absmax[sites["h"]].absmax, absmax[sites["C"]].absmax,
                                                          config.alpha))
    rotate_state_mamba2(mixer, random_hadamard(mixer.config.d_state, config.seed + 2))


def mambaquant_mamba1(layer, mixer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    ssms = branches(mixer)
    absmax = {mixer.sites["out_proj_in"]: AbsMaxObserver(), mixer.sites["x"]: AbsMaxObserver()}
    for ssm in ssms:
        absmax.update({ssm.sites[kind]: AbsMaxObserver() for kind in ("dt_low", "C", "h")})
    if config.smooth:
        runner.observe(absmax)
    online = config.online_transforms
    if online and config.smooth:
        smooth_gate(mixer, smoothing_scales(absmax[mixer.sites["out_proj_in"]].absmax, mixer.out_proj.weight,
                                            config.alpha))
    if online:
        rotate_out_proj_input(mixer)
    if config.smooth:
        smooth_conv_input(mixer, ssms,
                          smoothing_scales(absmax[mixer.sites["x"]].absmax, conv_weight_columns(mixer), config.alpha))
    offline = [ssm for ssm in ssms if fused_offline(ssm, config)]  # (an engine: not behind FalconMamba's norms)
    for ssm in ssms:
        if online:
            rotate_linear_input(ssm.sites["x_proj_in"], ssm.x_proj, Rotate(ssm.x_proj.in_features))
        if ssm in offline and config.smooth:
            smooth_dt_input(ssm, smoothing_scales(absmax[ssm.sites["dt_low"]].absmax, ssm.dt_proj.weight,
                                                  config.alpha))
            smooth_state(ssm, state_smoothing_scales(absmax[ssm.sites["h"]].absmax, absmax[ssm.sites["C"]].absmax,
                                                     config.alpha))
    covariances = {ssm.sites["dt_low"]: CovarianceObserver() for ssm in offline}
    if covariances:
        runner.observe(covariances)
    for ssm in offline:
        rotate_dt_path(ssm, klt_hadamard(covariances[ssm.sites["dt_low"]].covariance()))  # one K per site and block
        if online:
            rotate_state(ssm, random_hadamard(ssm.d_state, config.seed + 2))


def mambaquant_attention(layer, attention, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    if config.smooth:
        smoothquant_attention(layer, attention, runner, config, report)
    quarot_attention(layer, attention, runner, config, report)


def mambaquant_mlp(layer, mlp, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    if config.smooth:
        smooth_mlps([mlp], runner, config.alpha)
    quarot_mlp(layer, mlp, runner, config, report)


def mambaquant_moe(layer, moe, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    if config.smooth:
        smooth_mlps(moe.mlps(), runner, config.alpha)
    quarot_moe(layer, moe, runner, config, report)


RECIPE = (mambaquant_model, by_layer_kind(mamba1=mambaquant_mamba1, mamba2=mambaquant_mamba2,
                                          attention=mambaquant_attention, mlp=mambaquant_mlp, moe=mambaquant_moe),
          no_op)
