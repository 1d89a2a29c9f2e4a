"""SmoothQuant: smoothing scales at the input of every block (in the block norm, balanced against every layer that
reads it), then per layer: Mamba-1 at the conv1d and dt_proj inputs; Mamba-2 at the conv1d and out_proj inputs,
the last through the gated norm's weight; attention between v and o_proj (per key/value head); MLPs at the down_proj
input (in up_proj's rows; each expert's too); then at the head input."""

import torch

from ..transforms.klt import AbsMaxObserver
from ..transforms.rotation import branches, head_of, untie_head
from ..transforms.smoothing import (readers_weight, smooth_conv_input, smooth_conv_input_mamba2, smooth_down_input,
                                    smooth_dt_input, smooth_gated_norm, smooth_norm_output, smooth_values,
                                    smoothing_scales)
from .config import QuantConfig, QuantReport
from .stages import Runner, by_layer_kind, fused_offline, layer_kinds, no_op

INPUTS = {"mamba1": "conv1d, dt_proj", "mamba2": "conv1d, out_proj", "attention": "o_proj (in v_proj)",
          "mlp": "down_proj (in up_proj)", "moe": "each expert's down_proj (in up_proj)"}


def conv_weight_columns(mixer) -> torch.Tensor:
    """The conv1d taps of every branch as rows (taps x branches, channels): the "weight" a conv input smoothing
    balances."""
    convs = [mixer.conv1d] if hasattr(mixer, "conv1d") else [ssm.conv1d for ssm in branches(mixer)
                                                            if ssm.conv1d is not None]
    return torch.cat([conv.weight[:, 0, :].T for conv in convs])


def smoothquant_block(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> dict:
    """Every norm of the block balanced against its readers (`norm_readers`), from one pass, then each layer."""
    norms = layer.norm_readers()
    absmax = {site: AbsMaxObserver() for _, _, site in norms}
    runner.observe(absmax)
    for norm, readers, site in norms:
        smooth_norm_output(norm, readers, smoothing_scales(absmax[site].absmax, readers_weight(readers),
                                                           config.alpha), site)
    return per_layer(layer, runner, config, report)


def smoothquant_mamba2(layer, mixer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    absmax = {site: AbsMaxObserver() for site in (mixer.sites["xBC"], mixer.sites["out_proj_in"])}
    runner.observe(absmax)
    smooth_conv_input_mamba2(mixer, smoothing_scales(absmax[mixer.sites["xBC"]].absmax, conv_weight_columns(mixer),
                                                     config.alpha))
    smooth_gated_norm(mixer, smoothing_scales(absmax[mixer.sites["out_proj_in"]].absmax, mixer.out_proj.weight,
                                              config.alpha))


def smoothquant_mamba1(layer, mixer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    absmax = {mixer.sites["x"]: AbsMaxObserver()}
    absmax.update({ssm.sites["dt_low"]: AbsMaxObserver() for ssm in branches(mixer)})
    runner.observe(absmax)
    smooth_conv_input(mixer, branches(mixer),
                      smoothing_scales(absmax[mixer.sites["x"]].absmax, conv_weight_columns(mixer), config.alpha))
    for ssm in branches(mixer):
        if fused_offline(ssm, config):
            smooth_dt_input(ssm, smoothing_scales(absmax[ssm.sites["dt_low"]].absmax, ssm.dt_proj.weight,
                                                  config.alpha))


def smoothquant_attention(layer, attention, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    absmax = AbsMaxObserver()
    runner.observe({attention.sites["o_proj_in"]: absmax})
    smooth_values(attention, absmax.absmax, config.alpha)


def smooth_mlps(mlps: list, runner: Runner, alpha: float) -> None:
    """Each MLP's down_proj input smoothed (`smooth_down_input`), from one pass for all."""
    absmax = {mlp.sites["down_in"]: AbsMaxObserver() for mlp in mlps}
    runner.observe(absmax)
    for mlp in mlps:
        smooth_down_input(mlp, absmax[mlp.sites["down_in"]].absmax, alpha)


def smoothquant_mlp(layer, mlp, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    smooth_mlps([mlp], runner, config.alpha)


def smoothquant_moe(layer, moe, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    smooth_mlps(moe.mlps(), runner, config.alpha)


per_layer = by_layer_kind(mamba1=smoothquant_mamba1, mamba2=smoothquant_mamba2, attention=smoothquant_attention,
                          mlp=smoothquant_mlp, moe=smoothquant_moe)


def smoothquant_head(model, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    absmax = AbsMaxObserver()
    runner.observe({model.sites["norm_f"]: absmax})
    untie_head(model)  # the head's columns are about to be scaled, the embedding's must not be
    head = head_of(model)
    smooth_norm_output(model.norm_f, [head], smoothing_scales(absmax.absmax, head.weight, config.alpha),
                       model.sites["norm_f"])
    inputs = "; ".join(f"{kind}: {INPUTS[kind]}" for kind in layer_kinds(model))
    report.transforms.append(f"SmoothQuant (alpha {config.alpha}) at every block input (the block norm) and the head "
                             f"input; per layer at the inputs of {inputs}")


RECIPE = (no_op, smoothquant_block, smoothquant_head)
