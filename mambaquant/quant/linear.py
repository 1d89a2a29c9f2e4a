"""A linear layer with integer weights that quantizes its own input, run either as a floating-point simulation of
the integer arithmetic ("fake") or with real int8 matrix products ("int8"); and the embedding of a tied language
model that reads its rows from the quantized head."""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .quantizer import ActivationQuantizer, dequantize_weight

BACKENDS = ("fake", "int8")
# A float input of a weight-only linear on the int8 backend is split into this many int8 "limbs" (x ~ s q1 + s/254 q2
# + s/254^2 q3, each limb the rounding of what the ones before left): they miss x by at most 2^-23 of the row's
# largest |x| (the first division's rounding and the last limb's), float32's own precision. A few rows cost the same
# as one in a product bound by reading the weights.
LIMBS = 3
LIMB_STEP = 254  # each limb's scale is the previous one's / 254: the residual of a rounding fits [-127, 127] again


INT8_KERNELS_CHECKED = None  # per process: None before the check, then "" or what is wrong with torch._int_mm


def int8_product(q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """q (M, K) int8 times codes (N, K) int8 transposed: the exact int32 sums (M, N) from `torch._int_mm`.

    Its oneDNN path (torch 2.13 on CPU) reads the stride of a size-1 dimension as given, and returns wrong sums
    for layouts that are valid but not the usual ones: a width-1 weight codes.t() (1, N) with strides (1, 1), as
    dt_proj's at dt_rank 1, or a single row q (1, K) with strides (1, 1). So q goes in row-major with strides
    (K, 1) exactly, and the weight column-major (its transposed codes, strides (1, in_features)) except at K = 1,
    where it goes in row-major with strides (N, 1). `check_int8_kernels` tries these layouts at every degenerate
    size."""
    if q.stride() != (q.shape[1], 1):
        q = q.new_empty(q.shape).copy_(q)
    weight = codes.t()
    if weight.shape[0] == 1:
        weight = weight.new_empty(weight.shape).copy_(weight)
    return torch._int_mm(q, weight)


def kernel_check_cases():
    """(q, codes) pairs of extreme codes in the shapes the int8 backend multiplies: a wide input, whose int32 sums
    must neither saturate nor drift, and every small size of rows, inputs and outputs, whole or as a slice of
    wider tensors (a group of inputs), where a kernel may misread a degenerate layout."""
    generator = torch.Generator().manual_seed(0)

    def extreme(*shape):
        return torch.where(torch.rand(shape, generator=generator) < 0.5, -128, 127).to(torch.int8)

    q, codes = extreme(2, 4096), extreme(16, 4096)
    q[0], codes[0] = -128, -128  # the largest sum there is, 4096 * 2^14
    yield q, codes
    for rows in (1, 2, 5):
        for width in (1, 2, 3, 17):
            for out_features in (1, 2, 33):
                yield extreme(rows, width), extreme(out_features, width)
                yield extreme(rows, width + 3)[:, 1:width + 1], extreme(out_features, width + 3)[:, 2:width + 2]


def check_int8_kernels() -> None:
    """Once per process: `int8_product` on extreme codes in every shape the backend relies on, against exact int64
    sums (a CPU whose int8 path saturates, falls back to float or misreads a layout gives wrong numbers, not an
    error)."""
    global INT8_KERNELS_CHECKED
    if INT8_KERNELS_CHECKED is None:
        try:
            exact = all(torch.equal(int8_product(q, codes).long(), q.long() @ codes.long().t())
                        for q, codes in kernel_check_cases())
            INT8_KERNELS_CHECKED = "" if exact else "gives wrong sums for extreme codes"
        except (RuntimeError, NotImplementedError) as e:
            INT8_KERNELS_CHECKED = f"is not available ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if INT8_KERNELS_CHECKED:
        raise InputError(f"the int8 backend cannot run here: this CPU's int8 matrix product (torch._int_mm) "
                         f"{INT8_KERNELS_CHECKED}; use --backend fake")


def limb_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, K) float -> int8 limbs stacked as (LIMBS * rows, K) and the first limb's scale per row (rows, 1);
    limb i has scale s / LIMB_STEP^i. Written in few ops: at decoding a linear's input is one row, and each op
    costs more than its arithmetic."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).div_(127).clamp_(min=1e-30)
    y = torch.div(x, scale)  # |y| <= 127
    limbs = torch.empty((LIMBS, *x.shape), dtype=torch.int8)
    for limb, out in enumerate(limbs.unbind(0)):
        q = torch.round(y)
        out.copy_(q)
        if limb < LIMBS - 1:
            y = y.sub_(q).mul_(LIMB_STEP)  # y - q is exact and within [-1/2, 1/2]: the next limb's range [-127, 127]
    return limbs.view(-1, x.shape[1]), scale


def combine_limbs(sums: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The limbs' weight-scaled sums (LIMBS * rows, N) -> s * sum_i sums_i / LIMB_STEP^i, (rows, N), by Horner's
    rule."""
    parts = sums.view(LIMBS, -1, sums.shape[-1]).unbind(0)
    y = torch.div(parts[-1], LIMB_STEP)
    for part in parts[-2:0:-1]:
        y.add_(part).div_(LIMB_STEP)
    return y.add_(parts[0]).mul_(scale)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as int8 codes (4-bit codes use [-7, 7]) and per-channel or per-group scales.

    With an `input_quantizer` (activations quantized), the input becomes int8 codes q_x and a scale s_x per row or
    per tensor, and y = ((q_x q_w^T) * s_w) * s_x + b, per group of inputs summed over the groups when the weight
    scales are per group: the integer products summed exactly, in float32 ("fake", exact while the sums stay below
    2^24) or in int32 (`torch._int_mm`, "int8"), then the same float operations in the same order; so the two
    backends give the same numbers, bit for bit. Without one (weight-only quantization), "fake" multiplies by the
    dequantized weight in float32 and "int8" splits the float input into int8 limbs (`limb_codes`): the same result
    to float32 precision (the difference is bounded in tests/test_integer_kernels.py), with no float copy of W. An
    input quantizer with scales per block of the input (llama.cpp's, `--target llama.cpp`) gives the quantized
    input's values, which then take the weight-only path."""

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
        """A float copy of the codes for the simulation, made on first use and kept out of the state dict."""
        if getattr(self, name, None) is None:
            self.register_buffer(name, make(), persistent=False)
        return getattr(self, name)

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if backend == "int8":
            check_int8_kernels()
        self.backend = backend
        if backend == "int8":  # the simulation's float copies are not needed any more
            for name in ("weight_f", "codes_f"):
                if getattr(self, name, None) is not None:
                    delattr(self, name)

    def integer_sums(self, q: torch.Tensor, columns: slice) -> torch.Tensor:
        """q (rows, K') int8 times the codes' input columns `columns`, transposed: the exact integer sums (rows, N)
        as float32."""
        if self.backend == "int8":
            sums = int8_product(q, self.codes[:, columns])
            return sums.view(torch.float32).copy_(sums)  # int32 -> float32 in place: no second output-sized buffer
        return F.linear(q.float(), self.cached("codes_f", self.codes.float)[:, columns])

    def weight_scaled_sums(self, q: torch.Tensor) -> torch.Tensor:
        """sum over weight-scale groups of (q W_g^T) * s_w,g: (rows, N) float."""
        if self.scale.dim() == 2:
            return self.integer_sums(q, slice(None)).mul_(self.scale.view(-1))
        groups = self.scale.shape[1]
        width = self.in_features // groups
        y = None
        for g in range(groups):
            part = self.integer_sums(q[:, g * width:(g + 1) * width], slice(g * width, (g + 1) * width))
            part.mul_(self.scale[:, g, 0])
            y = part if y is None else y.add_(part)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        quantizer = self.input_quantizer
        if quantizer is not None and quantizer.spec.granularity == "block":  # an engine's scales per block of the
            rows, quantizer = quantizer(rows), None  # input (llama.cpp): its values, then the weight-only product
        if quantizer is not None:
            q, input_scale = quantizer.codes(x)
            y = self.weight_scaled_sums(q).mul_(input_scale)
        elif self.backend == "int8":
            limbs, scale = limb_codes(rows)
            y = combine_limbs(self.weight_scaled_sums(limbs), scale)
        else:
            y = F.linear(rows, self.cached("weight_f", self.dequantized_weight))
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        granularity = "per group" if self.scale.dim() == 3 else "per channel"
        return f"{self.in_features} -> {self.out_features}, int{self.bits} {granularity}, backend {self.backend}"


class QuantizedEmbedding(nn.Module):
    """The embedding of a tied language model whose head is quantized: row i is the head's codes of output i times
    their scales, read from the head's own tensors (shared, not copied, and not saved twice)."""

    def __init__(self, head: QuantizedLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.codes.shape
        self.register_buffer("codes", head.codes, persistent=False)
        self.register_buffer("scale", head.scale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return dequantize_weight(self.codes[flat], self.scale[flat]).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantized head"
