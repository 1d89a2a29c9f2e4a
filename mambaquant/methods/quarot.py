"""QuaRot: norm fusion and a randomised Hadamard on the residual stream, then per block Hadamards on the dt path,
the state dimension and the out_proj and x_proj inputs. Its weights are rounded by GPTQ (`WEIGHT_ROUNDING`)."""

from ..transforms.rotation import (Rotate, branches, fuse_norms, random_hadamard, rotate_dt_path, rotate_linear_input,
                                   rotate_residual, rotate_state)
from .config import QuantConfig, QuantReport
from .stages import Runner, no_op


def quarot_model(model, batches, config: QuantConfig, report: QuantReport) -> None:
    fuse_norms(model)
    rotate_residual(model, random_hadamard(model.config.d_model, config.seed))
    report.transforms.append("norm fusion; randomised Hadamard on the residual stream (offline); per block: "
                             "randomised Hadamard on the dt path (offline), Hadamard on the state dimension (C "
                             "offline, h online), online Hadamard at out_proj and x_proj inputs")


def quarot_block(layer, runner: Runner, config: QuantConfig, report: QuantReport) -> None:
    mixer = layer.mixer
    rotate_linear_input(mixer.sites["out_proj_in"], mixer.out_proj, Rotate(mixer.out_proj.in_features))
    for ssm in branches(mixer):
        rotate_linear_input(ssm.sites["x_proj_in"], ssm.x_proj, Rotate(ssm.x_proj.in_features))
        rotate_dt_path(ssm, random_hadamard(ssm.dt_rank, config.seed + 1))
        rotate_state(ssm, random_hadamard(ssm.d_state, config.seed + 2))


RECIPE = (quarot_model, quarot_block, no_op)
