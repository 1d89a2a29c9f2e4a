"""What the recipes and the walk share: a `Runner` for one stage of the model (a block, or the output head) and
the slots where the quantizers go (each quantized linear with the site carrying its input, and every quantized
activation site)."""

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..runtime import Mamba2Mixer, MambaLM, MambaMixer, Site
from ..runtime.attention import Attention
from ..runtime.mlp import MLP
from ..runtime.model import MLPHead
from ..runtime.moe import MoE
from ..runtime.parallel import ParallelMixer
from ..runtime.zamba import ZambaHybridBlock
from ..transforms.rotation import branches, each_block


class Runner:
    """Runs one stage of the model (a block, or the output head) over the stored calibration inputs (and the
    embedding outputs beside them, for a stage that reads them); inputs held in bfloat16 (`QuantConfig.calib_dtype`)
    are computed in float32."""

    def __init__(self, stage: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
                 embedded: list[torch.Tensor] | None = None):
        self.stage, self.inputs, self.embedded = stage, inputs, embedded

    def arguments(self):
        if self.embedded is None:
            return ((in_float32(x),) for x in self.inputs)
        return ((in_float32(x), in_float32(e)) for x, e in zip(self.inputs, self.embedded, strict=True))

    @torch.no_grad()
    def observe(self, observers: dict[Site, Callable]) -> None:
        with attached(observers):
            for arguments in self.arguments():
                self.stage(*arguments)

    @torch.no_grad()
    def outputs(self, observers: dict[Site, Callable] | None = None) -> list[torch.Tensor]:
        """The stage's outputs, watched by `observers` on the way (one pass for both)."""
        with attached(observers or {}):
            return [self.stage(*arguments) for arguments in self.arguments()]


def block_runner(layer: nn.Module, hidden: list[torch.Tensor], embedded: list[torch.Tensor] | None) -> Runner:
    """A runner for a block over its calibration inputs; a block that reads the embedding output (Zamba2's hybrid
    layer) gets it beside them."""
    return Runner(layer, hidden, embedded if layer.reads_embedding else None)


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


def parts(layer) -> list[nn.Module]:
    """The layers a block is made of: its mixer, Falcon-H1's Mamba-2 mixer and attention side by side, or Zamba2's
    shared attention and MLP and its Mamba-2 mixer."""
    mixer = layer.mixer
    if isinstance(layer, ZambaHybridBlock):
        return [layer.shared.attention, layer.shared.mlp, mixer]
    return [mixer.mamba, mixer.attention] if isinstance(mixer, ParallelMixer) else [mixer]


LAYER_KINDS = {MambaMixer: "mamba1", Mamba2Mixer: "mamba2", Attention: "attention", MLP: "mlp", MoE: "moe"}


def kind_of(part: nn.Module) -> str:
    return LAYER_KINDS[type(part)]


def layer_kinds(model) -> list[str]:
    """The kinds of layer the model's blocks are made of, in order of first appearance."""
    return list(dict.fromkeys(kind_of(part) for layer in model.layers for part in parts(layer)))


def by_layer_kind(**transforms: Callable) -> Callable:
    """A per-block transform that runs, on each part of the block (`parts`), the one written for its kind
    (`LAYER_KINDS`; nothing for a kind not given), as transform(layer, part, runner, config, report); the clusters
    of channels they return (Quamba2's) are merged."""
    def transform(layer, runner, config, report) -> dict:
        clusters = {}
        for part in parts(layer):
            if kind_of(part) in transforms:
                clusters.update(transforms[kind_of(part)](layer, part, runner, config, report) or {})
        return clusters
    return transform


def fixed_length(model) -> bool:
    """Whether every input has the same length, so that per-position activation ranges mean something."""
    return getattr(model, "fixed_positions", None) is not None


def has_mamba2_blocks(model) -> bool:
    return any(isinstance(module, Mamba2Mixer) for module in model.modules())


def fused_offline(ssm, config) -> bool:
    """Whether the dt-path and state transforms of a Mamba-1 branch may be applied: always in our runtime; for an
    engine target only where they fuse into x_proj's rows, not behind FalconMamba's weight-less dt / B / C norms
    (where they run online)."""
    return config.online_transforms or not ssm.inner_norm_eps


def block_linears(layer) -> list[tuple[nn.Module, str, Site]]:
    """The block's quantized linear layers as (owner, attribute, site carrying the input); a MoE's router stays in
    float (it picks the experts: a rounding there changes which weights a token sees)."""
    slots = [slot for part in parts(layer) for slot in part_linears(part, input_site(layer, part))]
    return slots + ([(layer, "linear", layer.sites["linear_in"])] if isinstance(layer, ZambaHybridBlock) else [])


def input_site(layer, part: nn.Module) -> Site:
    """The site carrying a layer's input: the block norm's output, or in Zamba2's shared block its own norm's."""
    if isinstance(layer, ZambaHybridBlock) and part is layer.shared.attention:
        return layer.shared.sites["attention_in"]
    return layer.sites["norm"]


def part_linears(part: nn.Module, input_site: Site) -> list[tuple[nn.Module, str, Site]]:
    """One layer's linears (`input_site` carries the block input to those that read it)."""
    if isinstance(part, Mamba2Mixer):
        return [(part, "in_proj", input_site), (part, "out_proj", part.sites["out_proj_in"])]
    if isinstance(part, MambaMixer):
        slots = [(part, "in_proj", input_site)]
        for ssm in branches(part):
            slots += [(ssm, "x_proj", ssm.sites["x_proj_in"]), (ssm, "dt_proj", ssm.sites["dt_low"])]
        return slots + [(part, "out_proj", part.sites["out_proj_in"])]
    if isinstance(part, Attention):
        return [(part, name, input_site) for name in ("q_proj", "k_proj", "v_proj")] + \
            [(part, "o_proj", part.sites["o_proj_in"])]
    if isinstance(part, MLP):
        inputs = [(part, name, part.sites["mlp_in"]) for name in ("gate_proj", "up_proj")
                  if getattr(part, name) is not None]
        return inputs + [(part, "down_proj", part.sites["down_in"])]
    slots = []  # a mixture of experts, its experts as an ExpertList (`Experts.as_list`)
    if part.fc1_latent_proj is not None:
        slots.append((part, "fc1_latent_proj", part.sites["fc1_latent_in"]))
    slots += [slot for expert in part.experts for slot in part_linears(expert, input_site)]
    if part.fc2_latent_proj is not None:
        slots.append((part, "fc2_latent_proj", part.sites["fc2_latent_in"]))
    return slots + (part_linears(part.shared_expert, input_site) if part.shared_expert is not None else [])


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


def block_activation_sites(layer, scope: str = "all") -> list[Site]:
    """Where a block's activations are quantized: the input of every quantized linear and, with `scope` "all", the
    operands of the SSM's other products: in a Mamba-1 layer the conv1d input and both operands of h*C; in a
    Mamba-2 layer the conv1d input x B C, the scan's inputs x and B (the SSD products read them, Quamba2's kernels
    take them as int8), C and h. Scope "linear" is the other tools' choice: linear inputs only."""
    sites = list(dict.fromkeys(site for _, _, site in block_linears(layer)))
    if scope == "linear":
        return sites
    for part in parts(layer):
        if isinstance(part, Mamba2Mixer):
            sites += [part.sites[kind] for kind in ("xBC", "x", "B", "C", "h")]
        elif isinstance(part, MambaMixer):
            sites.append(part.sites["x"])
            for ssm in branches(part):
                sites += [ssm.sites["h"], ssm.sites["C"]]
    return sites


def activation_sites(model: nn.Module, scope: str = "all") -> list[Site]:
    return [site for layer in model.layers for site in block_activation_sites(layer, scope)] + \
        head_activation_sites(model)
