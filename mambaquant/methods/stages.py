"""What the recipes and the walk share: a `Runner` for one stage of the model (a block, or the output head) and
the slots where the quantizers go (each quantized linear with the site carrying its input, and every quantized
activation site)."""

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..runtime import Mamba2Mixer, MambaLM, Site
from ..runtime.model import MLPHead
from ..transforms.rotation import branches, each_block


class Runner:
    """Runs one stage of the model (a block, or the output head) over the stored calibration inputs; inputs held in
    bfloat16 (`QuantConfig.calib_dtype`) are computed in float32."""

    def __init__(self, stage: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor]):
        self.stage, self.inputs = stage, inputs

    @torch.no_grad()
    def observe(self, observers: dict[Site, Callable]) -> None:
        with attached(observers):
            for x in self.inputs:
                self.stage(in_float32(x))

    @torch.no_grad()
    def outputs(self, observers: dict[Site, Callable] | None = None) -> list[torch.Tensor]:
        """The stage's outputs, watched by `observers` on the way (one pass for both)."""
        with attached(observers or {}):
            return [self.stage(in_float32(x)) for x in self.inputs]


def in_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype == torch.bfloat16 else x


def held(tensors: list[torch.Tensor], dtype: str) -> list[torch.Tensor]:
    """Calibration activations as held between stages (`QuantConfig.calib_dtype`)."""
    return [t.to(getattr(torch, dtype)) for t in tensors]


@contextlib.contextmanager
def attached(observers: dict[Site, Callable]):
    for site, observer in observers.items():
        site.observers.append(observer)
    try:
        yield
    finally:
        for site, observer in observers.items():
            site.observers.remove(observer)


class InMemoryBlocks:
    """The blocks of a model in memory, as the walk and the model-wide transforms reach them: `edit` applies a
    per-block edit to every block, `load` gives a block ready to run, `release` follows a statistics pass over it,
    `finish` its quantization. A streamed walk has the same four methods over blocks read from disk one at a time
    (`methods.streamed.StreamedBlocks`); here they hold the model's own blocks and have nothing to free."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __len__(self) -> int:
        return len(self.model.layers)

    def edit(self, block_edit: Callable[[nn.Module], None]) -> None:
        each_block(self.model)(block_edit)

    def load(self, index: int) -> nn.Module:
        return self.model.layers[index]

    def release(self, index: int) -> None:
        pass

    def finish(self, index: int) -> None:
        pass


def no_op(*args) -> None:
    return None


def is_mamba2(layer) -> bool:
    return isinstance(layer.mixer, Mamba2Mixer)


def fixed_length(model) -> bool:
    """Whether every input has the same length, so that per-position activation ranges mean something."""
    return getattr(model, "fixed_positions", None) is not None


def has_mamba2_blocks(model) -> bool:
    return any(is_mamba2(layer) for layer in model.layers)


def fused_offline(ssm, config) -> bool:
    """Whether the dt-path and state transforms of a Mamba-1 branch may be applied: always in our runtime; for an
    engine target only where they fuse into x_proj's rows, not behind FalconMamba's weight-less dt / B / C norms
    (where they run online)."""
    return config.online_transforms or not ssm.inner_norm_eps


def by_block_kind(mamba1: Callable, mamba2: Callable) -> Callable:
    """A per-block transform that runs the one written for the layer's block kind."""
    def transform(layer, *args) -> None:
        return (mamba2 if is_mamba2(layer) else mamba1)(layer, *args)
    return transform


def block_linears(layer) -> list[tuple[nn.Module, str, Site]]:
    """The block's quantized linear layers as (owner, attribute, site carrying the input)."""
    mixer = layer.mixer
    slots = [(mixer, "in_proj", layer.sites["norm"])]
    if is_mamba2(layer):
        return slots + [(mixer, "out_proj", mixer.sites["out_proj_in"])]
    for ssm in branches(mixer):
        slots += [(ssm, "x_proj", ssm.sites["x_proj_in"]), (ssm, "dt_proj", ssm.sites["dt_low"])]
    return slots + [(mixer, "out_proj", mixer.sites["out_proj_in"])]


def head_slots(model) -> list[tuple[nn.Module, str, Site]]:
    """The head's linear layers (an MLP head has two) with the sites carrying their inputs."""
    if isinstance(model, MambaLM):
        return [(model, "lm_head", model.sites["norm_f"])]
    if isinstance(model.head, MLPHead):
        return [(model.head, "fc1", model.sites["norm_f"]), (model.head, "fc2", model.head.sites["hidden"])]
    return [(model, "head", model.sites["norm_f"])]


def head_activation_sites(model) -> list[Site]:
    return [site for _, _, site in head_slots(model)]


def linear_slots(model) -> list[tuple[nn.Module, str, Site]]:
    """Every quantized linear layer of the model with the site that carries its input."""
    return [slot for layer in model.layers for slot in block_linears(layer)] + head_slots(model)


def block_activation_sites(layer) -> list[Site]:
    """Where a block's activations are quantized: every linear input, the conv1d input, both operands of h*C; in
    a Mamba-2 block the conv1d input is x B C, and the scan's inputs x and B are quantized too (the SSD products
    read them, Quamba2's kernels take them as int8)."""
    sites = [site for _, _, site in block_linears(layer)]
    if is_mamba2(layer):
        return sites + [layer.mixer.sites[kind] for kind in ("xBC", "x", "B", "C", "h")]
    sites.append(layer.mixer.sites["x"])
    for ssm in branches(layer.mixer):
        sites += [ssm.sites["h"], ssm.sites["C"]]
    return sites


def activation_sites(model: nn.Module) -> list[Site]:
    return [site for layer in model.layers for site in block_activation_sites(layer)] + head_activation_sites(model)
