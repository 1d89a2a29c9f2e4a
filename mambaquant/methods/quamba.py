"""Quamba-style: per Mamba layer an online Hadamard at the out_proj input. Its percentile ranges at the SSM input and
state are chosen in walk.py (`PERCENTILE_SITES`). The same recipe serves both Mamba kinds; a hybrid's attention, MLP
and expert layers get Quamba's static per-tensor int8 at their linears' inputs and nothing else (its paper
quantizes no other layer kind: docs/methods.md)."""

from ..runtime import Mamba2Mixer
from ..transforms.rotation import rotate_out_proj_input
from .config import QuantConfig, QuantReport
from .stages import Runner, by_layer_kind, has_mamba2_blocks, no_op


def quamba_model(model, blocks, batches, config: QuantConfig, report: QuantReport) -> None:
    scan_input = "x" if has_mamba2_blocks(model) else "x_proj_in"
    if config.target == "vllm":
        report.transforms.append("per block: online Hadamard at out_proj input (its percentile ranges are at sites "
                                 "vLLM does not quantize)")
    elif config.online_transforms:
        report.transforms.append(f"per block: online Hadamard at out_proj input; percentile ranges at the SSM input "
                                 f"({scan_input}) and state (h)")


def quamba_mamba(layer, mixer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    if config.online_transforms or (config.online_input_hadamards and isinstance(mixer, Mamba2Mixer)):
        rotate_out_proj_input(mixer)


RECIPE = (quamba_model, by_layer_kind(mamba1=quamba_mamba, mamba2=quamba_mamba), no_op)
