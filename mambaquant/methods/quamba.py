"""Quamba-style: per block an online Hadamard at the out_proj input. Its percentile ranges at the SSM input and
state are chosen in walk.py (`PERCENTILE_SITES`). The same recipe serves both block kinds."""

from ..transforms.rotation import rotate_out_proj_input
from .config import QuantConfig, QuantReport
from .stages import Runner, has_mamba2_blocks, no_op


def quamba_model(model, blocks, batches, config: QuantConfig, report: QuantReport) -> None:
    scan_input = "x" if has_mamba2_blocks(model) else "x_proj_in"
    if config.online_transforms:
        report.transforms.append(f"per block: online Hadamard at out_proj input; percentile ranges at the SSM input "
                                 f"({scan_input}) and state (h)")


def quamba_block(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    if config.online_transforms:
        rotate_out_proj_input(layer.mixer)


RECIPE = (quamba_model, quamba_block, no_op)
