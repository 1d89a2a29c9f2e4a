"""SmoothQuant: smoothing scales, per block at the in_proj, conv1d and dt_proj inputs, then at the head input."""

import torch

from ..transforms.klt import AbsMaxObserver
from ..transforms.rotation import branches, head_of, untie_head
from ..transforms.smoothing import smooth_conv_input, smooth_dt_input, smooth_norm_output, smoothing_scales
from .config import QuantConfig, QuantReport
from .stages import Runner, no_op


def conv_weight_columns(mixer) -> torch.Tensor:
    """The conv1d taps of every branch as rows (taps x branches, E): the "weight" a conv input smoothing balances."""
    return torch.cat([ssm.conv1d.weight[:, 0, :].T for ssm in branches(mixer)])


def smoothquant_block(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    mixer = layer.mixer
    absmax = {layer.sites["norm"]: AbsMaxObserver(), mixer.sites["x"]: AbsMaxObserver()}
    absmax.update({ssm.sites["dt_low"]: AbsMaxObserver() for ssm in branches(mixer)})
    runner.observe(absmax)
    smooth_norm_output(layer.norm, mixer.in_proj,
                       smoothing_scales(absmax[layer.sites["norm"]].absmax, mixer.in_proj.weight, config.alpha))
    smooth_conv_input(mixer, branches(mixer),
                      smoothing_scales(absmax[mixer.sites["x"]].absmax, conv_weight_columns(mixer), config.alpha))
    for ssm in branches(mixer):
        smooth_dt_input(ssm, smoothing_scales(absmax[ssm.sites["dt_low"]].absmax, ssm.dt_proj.weight, config.alpha))


def smoothquant_head(model, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    absmax = AbsMaxObserver()
    runner.observe({model.sites["norm_f"]: absmax})
    untie_head(model)  # the head's columns are about to be scaled, the embedding's must not be
    head = head_of(model)
    smooth_norm_output(model.norm_f, head, smoothing_scales(absmax.absmax, head.weight, config.alpha))
    report.transforms.append(f"SmoothQuant (alpha {config.alpha}) at in_proj, conv1d, dt_proj and head inputs")


RECIPE = (no_op, smoothquant_block, smoothquant_head)
