"""Quantization error of a quantized model on the calibration inputs, as a signal-to-quantization-noise ratio.

SQNR = 10 log10(sum x^2 / sum (x - Q(x))^2) in dB, where x is the tensor an activation quantizer receives (after the
method's transforms at that site: an orthogonal rotation leaves both sums unchanged, a smoothing scale does not) and
Q(x) its quantize-dequantize; the sums run over every value on every calibration input. A layer's SQNR is the mean
in dB over its quantizers; a site kind's, over the quantizers of that kind in all layers; the model's activation
SQNR, over all quantizers. The output SQNR compares the quantized model's output with the full-precision model's on
the same inputs (weights and activations together).
"""

from collections import defaultdict
from math import log10

import torch
from torch import nn

from ..methods import linear_slots
from ..quant.linear import QuantizedLinear
from ..quant.quantizer import ActivationQuantizer
from ..runtime import find_sites
from .stats import row_chunks

SQNR = ("10 log10(sum x^2 / sum (x - Q(x))^2) in dB over the calibration inputs: x the tensor an activation "
        "quantizer receives, Q(x) its quantize-dequantize; per layer, per site kind and overall: the mean in dB over "
        "those quantizers; output: the quantized model's output against the full-precision model's, same formula")


def sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    return 10 * log10(signal / noise)


class ErrorEnergy:
    """Running sum x^2 and sum (x - Q(x))^2 of one quantizer, in float64."""

    def __init__(self):
        self.signal = self.noise = 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor, quantized: torch.Tensor) -> None:
        for part, part_quantized in zip(row_chunks(x.reshape(-1, x.shape[-1])),
                                        row_chunks(quantized.reshape(-1, x.shape[-1]))):
            self.signal += part.double().square().sum().item()
            self.noise += (part.double() - part_quantized.double()).square().sum().item()


def activation_quantizers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Site name -> ("op" | "linear", the module to hook) for every activation quantizer of a quantized model."""
    found = {}
    for name, site in find_sites(model).items():
        ops = list(site.op) if isinstance(site.op, nn.Sequential) else [site.op]
        for op in ops:
            if isinstance(op, ActivationQuantizer):
                found[name] = ("op", op)
    for owner, attribute, site in linear_slots(model):
        linear = getattr(owner, attribute)
        if isinstance(linear, QuantizedLinear) and linear.input_quantizer is not None:
            found[site.name] = ("linear", linear)
    return found


def attach(model: nn.Module) -> tuple[dict[str, ErrorEnergy], list]:
    """Hooks that measure every activation quantizer: a site op through its forward; a quantized linear, which turns
    its input into integer codes itself, by quantize-dequantizing that input with its own quantizer (the same
    numbers: codes times scales)."""
    energies, handles = {}, []
    for name, (where, module) in activation_quantizers(model).items():
        energy = energies[name] = ErrorEnergy()
        if where == "op":
            handles.append(module.register_forward_hook(lambda m, inputs, output, e=energy: e.add(inputs[0], output)))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda m, inputs, e=energy: e.add(inputs[0], m.input_quantizer(inputs[0]))))
    return energies, handles


def layer_of(site_name: str) -> str:
    parts = site_name.split(".")
    return parts[1] if parts[0] == "layers" else "head"


def kind_of(site_name: str) -> str:
    return ".".join(p for p in site_name.split(".") if not p.isdigit() and p not in ("layers", "mixer"))


def mean_db(sqnr: dict[str, float], group) -> dict[str, float]:
    """Mean SQNR in dB over the quantizers of each group: every quantizer counts once, whatever the scale of its
    tensor (smoothing changes the scale, so pooled energies would not compare across methods)."""
    groups = defaultdict(list)
    for name, value in sqnr.items():
        groups[group(name)].append(value)
    return {key: sum(values) / len(values) for key, values in groups.items()}


@torch.no_grad()
def measure(quantized: nn.Module, reference: nn.Module, batches: list[torch.Tensor]) -> dict:
    """SQNR per quantizer, per layer, per site kind, over all, and of the model output against `reference`."""
    energies, handles = attach(quantized)
    output = ErrorEnergy()
    try:
        for batch in batches:
            output.add(reference(batch), quantized(batch))
    finally:
        for handle in handles:
            handle.remove()
    sites = {name: sqnr_db(e.signal, e.noise) for name, e in energies.items()}
    return {"activations_db": sum(sites.values()) / len(sites),
            "output_db": sqnr_db(output.signal, output.noise),
            "layers_db": mean_db(sites, layer_of),
            "kinds_db": mean_db(sites, kind_of),
            "sites_db": sites}
