"""A linear layer with integer weights that quantizes its own input, run either as a floating-point simulation of
the integer arithmetic ("fake") or with real int8 matrix products ("int8")."""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .quantizer import ActivationQuantizer, dequantize_weight

BACKENDS = ("fake", "int8")


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as int8 codes (4-bit codes use [-7, 7]) and per-channel or per-group scales.

    With an `input_quantizer` (activations quantized), the input becomes int8 codes and a scale per row, and
    y = (q_x q_w^T) * s_x s_w + b: the integer products summed exactly, in float32 ("fake", exact while the sums stay
    below 2^24) or in int32 (`torch._int_mm`, "int8"); so the two backends agree to the last rounding of the final
    multiply. Without one (weight-only quantization), the dequantized weight in a floating-point product."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
                 input_quantizer: ActivationQuantizer | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.bits = bits
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.float())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.input_quantizer = input_quantizer
        self.backend = "fake"

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale)

    def cached(self, name: str, make) -> torch.Tensor:
        """A derived copy of the codes, made on first use and kept out of the state dict."""
        if getattr(self, name, None) is None:
            self.register_buffer(name, make(), persistent=False)
        return getattr(self, name)

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if backend == "int8" and self.input_quantizer is None:
            raise InputError("the int8 backend needs activations quantized to 8 bits or fewer at every linear input; "
                             "this model keeps them in floating point (use the fake backend)")
        if backend == "int8" and self.scale.dim() == 3:
            raise InputError("the int8 backend needs per-channel weight scales, not per-group ones")
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is None:
            y = F.linear(x, self.cached("weight_f", self.dequantized_weight))
        else:
            q, row_scale = self.input_quantizer.codes(x)
            if self.scale.dim() == 3:  # per-group weight scales (fake backend only): dequantize both sides
                y = F.linear(q.float() * row_scale, self.cached("weight_f", self.dequantized_weight))
            elif self.backend == "int8":
                y = torch._int_mm(q, self.cached("codes_t", lambda: self.codes.t().contiguous())).float()
                y.mul_(row_scale * self.scale.view(1, -1))
            else:
                y = F.linear(q.float(), self.cached("codes_f", self.codes.float)).mul_(row_scale * self.scale.view(1, -1))
            y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        granularity = "per group" if self.scale.dim() == 3 else "per channel"
        return f"{self.in_features} -> {self.out_features}, int{self.bits} {granularity}, backend {self.backend}"
