"""QuaRot: norm fusion and a randomised Hadamard on the residual stream, then per block Hadamards on the dt path,
the state dimension and the out_proj and x_proj inputs; in a Mamba-2 block an online Hadamard at the out_proj
input (its C passes a SiLU after the conv, so a Hadamard on the state dimension fuses nowhere and is left out).
Its weights are rounded by GPTQ (`WEIGHT_ROUNDING`)."""

from ..transforms.rotation import (Rotate, branches, fuse_norms, random_hadamard, rotate_dt_path, rotate_linear_input,
                                   rotate_out_proj_input, rotate_residual, rotate_state)
from .config import QuantConfig, QuantReport
from .stages import Runner, by_block_kind, fused_offline, has_mamba2_blocks, no_op


def quarot_model(model, blocks, batches, config: QuantConfig, report: QuantReport) -> None:
    fuse_norms(model, blocks.edit, untie=not config.online_transforms)
    rotate_residual(model, random_hadamard(model.config.d_model, config.seed), blocks.edit)
    if not config.online_transforms:
        per_block = "nothing" if has_mamba2_blocks(model) else "randomised Hadamard on the dt path (offline)"
    else:
        per_block = ("online Hadamard at out_proj input" if has_mamba2_blocks(model) else
                     "randomised Hadamard on the dt path (offline), Hadamard on the state dimension (C offline, h "
                     "online), online Hadamard at out_proj and x_proj inputs")
    report.transforms.append(f"norm fusion; randomised Hadamard on the residual stream (offline); per block: "
                             f"{per_block}")


def quarot_block_mamba2(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    if config.online_transforms:
        rotate_out_proj_input(layer.mixer)


def quarot_block_mamba1(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    mixer = layer.mixer
    if config.online_transforms:
        rotate_out_proj_input(mixer)
    for ssm in branches(mixer):
        if config.online_transforms:
            rotate_linear_input(ssm.sites["x_proj_in"], ssm.x_proj, Rotate(ssm.x_proj.in_features))
        if fused_offline(ssm, config):
            rotate_dt_path(ssm, random_hadamard(ssm.dt_rank, config.seed + 1))
        if config.online_transforms:
            rotate_state(ssm, random_hadamard(ssm.d_state, config.seed + 2))


RECIPE = (quarot_model, by_block_kind(quarot_block_mamba1, quarot_block_mamba2), no_op)
