"""SmoothQuant: smoothing scales, per block at the in_proj, conv1d and dt_proj inputs (Mamba-2: in_proj, conv1d
and out_proj inputs, the last through the gated norm's weight), then at the head input."""

import torch

from ..transforms.klt import AbsMaxObserver
from ..transforms.rotation import branches, head_of, untie_head
from ..transforms.smoothing import (smooth_conv_input, smooth_conv_input_mamba2, smooth_dt_input, smooth_gated_norm,
                                    smooth_norm_output, smoothing_scales)
from .config import QuantConfig, QuantReport
from .stages import Runner, by_block_kind, fused_offline, has_mamba2_blocks, no_op


def conv_weight_columns(mixer) -> torch.Tensor:
    """The conv1d taps of every branch as rows (taps x branches, channels): the "weight" a conv input smoothing
    balances."""
    convs = [mixer.conv1d] if hasattr(mixer, "conv1d") else [ssm.conv1d for ssm in branches(mixer)
                                                            if ssm.conv1d is not None]
    return torch.cat([conv.weight[:, 0, :].T for conv in convs])


def smoothquant_block_mamba2(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    mixer = layer.mixer
    absmax = {site: AbsMaxObserver() for site in (layer.sites["norm"], mixer.sites["xBC"], mixer.sites["out_proj_in"])}
    runner.observe(absmax)
    smooth_norm_output(layer.norm, mixer.in_proj,
                       smoothing_scales(absmax[layer.sites["norm"]].absmax, mixer.in_proj.weight, config.alpha),
                       layer.sites["norm"])
    smooth_conv_input_mamba2(mixer, smoothing_scales(absmax[mixer.sites["xBC"]].absmax, conv_weight_columns(mixer),
                                                     config.alpha))
    smooth_gated_norm(mixer, smoothing_scales(absmax[mixer.sites["out_proj_in"]].absmax, mixer.out_proj.weight,
                                              config.alpha))


def smoothquant_block_mamba1(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    mixer = layer.mixer
    absmax = {layer.sites["norm"]: AbsMaxObserver(), mixer.sites["x"]: AbsMaxObserver()}
    absmax.update({ssm.sites["dt_low"]: AbsMaxObserver() for ssm in branches(mixer)})
    runner.observe(absmax)
    smooth_norm_output(layer.norm, mixer.in_proj,
                       smoothing_scales(absmax[layer.sites["norm"]].absmax, mixer.in_proj.weight, config.alpha),
                       layer.sites["norm"])
    smooth_conv_input(mixer, branches(mixer),
                      smoothing_scales(absmax[mixer.sites["x"]].absmax, conv_weight_columns(mixer), config.alpha))
    for ssm in branches(mixer):
        if fused_offline(ssm, config):
            smooth_dt_input(ssm, smoothing_scales(absmax[ssm.sites["dt_low"]].absmax, ssm.dt_proj.weight,
                                                  config.alpha))


def smoothquant_head(model, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    absmax = AbsMaxObserver()
    runner.observe({model.sites["norm_f"]: absmax})
    untie_head(model)  # the head's columns are about to be scaled, the embedding's must not be
    head = head_of(model)
    smooth_norm_output(model.norm_f, head, smoothing_scales(absmax.absmax, head.weight, config.alpha),
                       model.sites["norm_f"])
    inputs = "in_proj, conv1d, out_proj" if has_mamba2_blocks(model) else "in_proj, conv1d, dt_proj"
    report.transforms.append(f"SmoothQuant (alpha {config.alpha}) at {inputs} and head inputs")


RECIPE = (no_op, by_block_kind(smoothquant_block_mamba1, smoothquant_block_mamba2), smoothquant_head)
