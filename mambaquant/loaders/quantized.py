"""Quantized checkpoints: config.json (the model config + a `quantization_config` block) and model.safetensors
(integer weight codes, 4-bit ones packed two per byte, their scales, activation ranges, rotation matrices,
smoothing vectors), written atomically; and their reloading into a model that runs exactly like the original.

A checkpoint is verified, not trusted. Loading checks, in this order, and refuses with one line at the first problem:
1. the format version;
2. every field of config.json against a schema (`QUANT_CONFIG`, `QUANT_SPEC`, the layout's tables, the model
   config's dataclass): JSON types (a boolean is a bool, an integer is not a bool, a float or a string), allowed
   values and ranges, no field missing, none unknown;
3. each tensor's bytes against the sha256 recorded for it at save (`tensor_sha256`: dtype, shape and raw data), and
   the tensors present against those recorded: a flipped bit, a swap or a rename is caught here;
4. the layout against the model that `model_config` builds (on the meta device, allocating nothing): every linear
   and site it names exists, with the shapes and widths the config gives; then every tensor's name, dtype and
   shape against that model;
5. the values: codes within their bit width's range, weight scales finite and positive, activation ranges finite
   and ordered, rotation matrices orthogonal, smoothing scales finite and positive, everything else finite.

Format version 2 (version 1 had no hashes and is refused): `quantization_config.layout` holds `linears`
({module: quantized {shape, bits, bias, input} or float {float, bias}}), `sites` ({site: [ops]}), `gate_scales`
(the mixers with an S-SiLU smoothing vector) and `sha256` ({tensor: hex digest}). A tied language model stores its
shared matrix once: as the head's codes when the head is quantized, as `embedding.weight` when it is not."""

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import InputError
from ..quant.linear import QuantizedLinear
from ..quant.quantizer import ACTIVATION_GRANULARITIES, OBSERVERS, ActivationQuantizer, QuantSpec, dequantize_weight
from ..runtime import LMConfig, MambaLM, MambaMixer, MambaTagger, Site, TaggerConfig, VisionConfig, VisionMamba
from ..runtime.config import BIDIRECTIONAL, CONVS, NORMS
from ..transforms.rotation import Rotate, append_op

ARCHITECTURE = "mambaquant-quantized"
FORMAT_VERSION = 2
MODELS = {"MambaLM": (MambaLM, LMConfig), "VisionMamba": (VisionMamba, VisionConfig),
          "MambaTagger": (MambaTagger, TaggerConfig)}
FULL_PRECISION = 16  # bits meaning "not quantized" (methods.FULL_PRECISION)
WEIGHT_ROUNDINGS = ("rtn", "gptq")
ORTHOGONALITY_TOLERANCE = 1e-3  # max |R R^T - I| of a stored rotation (float32 rounding is ~1e-6)
# Channel width of the tensor at each site kind (runtime/sites.py): D d_model, E d_inner, N d_state, R dt_rank,
# K the head's outputs
SITE_WIDTHS = {"embed": "D", "norm_f": "D", "residual": "D", "norm": "D", "out": "D", "logits": "K",
               "x": "E", "z": "E", "gate": "E", "out_proj_in": "E", "conv": "E", "x_proj_in": "E", "dt": "E",
               "hC": "E", "y": "E", "dt_low": "R", "B": "N", "C": "N", "dA": "N", "dBu": "N", "h": "N"}


# ---------------------------------------------------------------------------------------------------------------
# Hashing and int4 packing
# ---------------------------------------------------------------------------------------------------------------


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor as written to the file: its dtype and shape, then its raw (little-endian) bytes. Any
    dtype (bf16 included: the bytes are viewed as uint8, never converted)."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}\n".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [-8, 7] -> uint8, two per byte (first in the low nibble); an odd count is padded with one zero."""
    flat = (codes.flatten().to(torch.int16) + 8).to(torch.uint8)
    if len(flat) % 2:
        flat = torch.cat([flat, torch.full((1,), 8, dtype=torch.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()
    count = int(torch.tensor(shape).prod())
    return (pairs[:count].to(torch.int16) - 8).to(torch.int8).reshape(shape)


def packed_length(out_features: int, in_features: int) -> int:
    return -(-out_features * in_features // 2)


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def site_ops(site: Site) -> list[nn.Module]:
    if site.op is None:
        return []
    return list(site.op) if isinstance(site.op, nn.Sequential) else [site.op]


def describe_op(op: nn.Module, where: str) -> dict:
    if isinstance(op, Rotate):
        return {"op": "rotate", "size": op.size, "matrix": op.matrix is not None}
    if isinstance(op, ActivationQuantizer):
        return {"op": "quantize", "spec": vars(op.spec).copy()}
    raise InputError(f"cannot save the op {type(op).__name__} at {where}")


def quantized_tensors_and_layout(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors to write and the layout that rebuilds the modules holding them, with each tensor's sha256."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    linears, sites, gate_scales = {}, {}, []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            quantizer = module.input_quantizer
            linears[name] = {"shape": list(module.codes.shape), "bits": module.bits, "bias": module.bias is not None,
                             "input": vars(quantizer.spec).copy() if quantizer is not None else None}
            if module.bits <= 4:
                tensors[f"{name}.codes_int4"] = pack_int4(tensors.pop(f"{name}.codes"))
        elif isinstance(module, nn.Linear) and module.bias is not None:
            linears[name] = {"float": True, "bias": True}
        elif isinstance(module, Site) and module.op is not None:
            sites[module.name] = [describe_op(op, module.name) for op in site_ops(module)]
        elif isinstance(module, MambaMixer) and module.gate_scale is not None:
            gate_scales.append(name)
    if isinstance(model, MambaLM) and model.config.tie_embeddings:  # one matrix, stored once
        if isinstance(model.lm_head, QuantizedLinear):
            del tensors["embedding.weight"]  # it is the head's matrix: rebuilt from the head's codes
        elif model.lm_head.weight is model.embedding.weight:
            del tensors["lm_head.weight"]  # it is the embedding: re-tied on load
        else:
            raise InputError("cannot save this model: its config ties the head to the embedding, but the two hold "
                             "different matrices")
    sha256 = {name: tensor_sha256(tensor) for name, tensor in tensors.items()}
    return tensors, {"linears": linears, "sites": sites, "gate_scales": gate_scales, "sha256": sha256}


def quantized_config(model: nn.Module, layout: dict) -> dict:
    report = model.quantization_report
    if not isinstance(model, tuple(model_class for model_class, _ in MODELS.values())):
        raise InputError(f"cannot save a {type(model).__name__}; expected MambaLM, VisionMamba or MambaTagger")
    return {"architecture": ARCHITECTURE, "model_class": type(model).__name__,
            "model_config": model.config.to_dict(),
            "quantization_config": {"format_version": FORMAT_VERSION, **report.config,
                                    "activation_sites": report.activation_sites, "transforms": report.transforms,
                                    "layout": layout}}


def model_card(config: dict, metrics: list[str]) -> str:
    q = config["quantization_config"]
    activations = "not quantized" if q["a_bits"] == 16 else f"int{q['a_bits']}, granularity {q['act_granularity']}"
    lines = [f"# {config['model_class']} quantized with {q['method']}", "",
             f"- weights: int{q['w_bits']} ({q['weight_rounding']}), activations: {activations}",
             f"- format: mambaquant quantized checkpoint, version {q['format_version']} "
             "(load with `mambaquant.load(DIR)`)"]
    lines += [f"- transforms: {t}" for t in q["transforms"]]
    lines += [f"- {m}" for m in metrics]
    return "\n".join(lines) + "\n"


def is_quantized_config(config: dict) -> bool:
    return config.get("architecture") == ARCHITECTURE


# ---------------------------------------------------------------------------------------------------------------
# The config.json schema: field -> (accepts(value), what is expected)
# ---------------------------------------------------------------------------------------------------------------

Check = tuple[Callable[[object], bool], str]


def integer(low: int | None = None, high: int | None = None, also: tuple[int, ...] = ()) -> Check:
    def accepts(v):
        return type(v) is int and ((low is None or v >= low) and (high is None or v <= high) or v in also)

    text = ("an integer" if low is None else f"an integer from {low} to {high}" if high is not None
            else f"an integer >= {low}") + "".join(f" or {a}" for a in also)
    return accepts, text


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> Check:
    def accepts(v):
        finite = type(v) is int or type(v) is float and math.isfinite(v)  # (a huge int has no float)
        return finite and (v > low if low_open else v >= low) and v <= high

    bounds = [f"{'>' if low_open else '>='} {low:g}"] if low > -math.inf else []
    bounds += [f"<= {high:g}"] if high < math.inf else []
    return accepts, "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")


def one_of(values) -> Check:
    return (lambda v: type(v) is str and v in values), f"one of {', '.join(map(repr, values))}"


def constant(value) -> Check:
    return (lambda v: type(v) is type(value) and v == value), json.dumps(value)


BOOLEAN: Check = (lambda v: type(v) is bool, "true or false")
TEXT: Check = (lambda v: type(v) is str, "a string")
OBJECT: Check = (lambda v: type(v) is dict, "a JSON object")
SCALAR: Check = (lambda v: v is None or type(v) in (bool, int, str) or type(v) is float and math.isfinite(v),
                 "a JSON scalar")
TEXTS: Check = (lambda v: type(v) is list and all(type(x) is str for x in v), "a list of strings")
TEXT_VALUES: Check = (lambda v: type(v) is dict and all(type(x) is str for x in v.values()), "an object of strings")
SHAPE: Check = (lambda v: type(v) is list and len(v) == 2 and all(type(x) is int and x >= 1 for x in v),
                "[out_features, in_features], two positive integers")
SHA256: Check = (lambda v: type(v) is str and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
                 "a sha256 digest (64 lowercase hex digits)")
BITS: Check = integer(2, 8)


def dataclass_schema(cls, **overrides: Check) -> dict[str, Check]:
    """A dataclass's fields as a schema: the given checks, else one from the field's default (its JSON type)."""
    by_type = {bool: BOOLEAN, int: integer(1), float: number(), str: TEXT}
    return {f.name: overrides.get(f.name) or by_type.get(type(f.default), SCALAR) for f in dataclasses.fields(cls)}


QUANT_SPEC = dataclass_schema(QuantSpec, bits=BITS, symmetric=BOOLEAN, granularity=one_of(ACTIVATION_GRANULARITIES),
                              group_size=integer(1), dynamic=BOOLEAN, observer=one_of(OBSERVERS),
                              percentile=number(50, 100, low_open=True))
MODEL_CONFIG_CHECKS = dict(n_layer=integer(0), dt_rank=integer(0), norm=one_of(NORMS), conv=one_of(CONVS),
                           bidirectional=one_of(BIDIRECTIONAL), dt_offset=number(), norm_eps=number(0, low_open=True))
QUANTIZED_LINEAR = {"shape": SHAPE, "bits": BITS, "bias": BOOLEAN,
                    "input": (lambda v: v is None or type(v) is dict, "null or a quantizer spec object")}
FLOAT_LINEAR = {"float": constant(True), "bias": constant(True)}
SITE_OPS = {"rotate": {"op": constant("rotate"), "size": integer(1), "matrix": BOOLEAN},
            "quantize": {"op": constant("quantize"), "spec": OBJECT}}
LAYOUT = {"linears": OBJECT, "sites": OBJECT, "gate_scales": TEXTS, "sha256": OBJECT}
CHECKPOINT = {"architecture": constant(ARCHITECTURE), "model_class": one_of(tuple(MODELS)), "model_config": OBJECT,
              "quantization_config": OBJECT}


def quant_config_schema() -> dict[str, Check]:
    from ..methods import GRANULARITIES, METHODS, QuantConfig

    bits = integer(2, 8, also=(FULL_PRECISION,))
    return {"format_version": constant(FORMAT_VERSION),
            **dataclass_schema(QuantConfig, method=one_of(METHODS), w_bits=bits, a_bits=bits,
                               act_granularity=one_of(GRANULARITIES), observer=one_of(OBSERVERS),
                               percentile=number(50, 100, low_open=True), weight_group_size=integer(0),
                               weight_rounding=one_of(WEIGHT_ROUNDINGS), alpha=number(),
                               token_outlier_ratio=number(0), token_outlier_share=number(0, 1), seed=integer()),
            "activation_sites": TEXT_VALUES, "transforms": TEXTS, "layout": OBJECT}


def shown(value, limit: int = 60) -> str:
    """A JSON value as one short line (JSON spelling: true, null, "8")."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def described(value) -> str:
    """A JSON value as one short line, a container with its kind: `9`, `"8"`, `true`, `a list [64, 16]`."""
    return f"{json_kind(value)} {shown(value)}" if type(value) in (dict, list) else shown(value)


def json_kind(value) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def label(name: str) -> str:
    """A module, site or tensor name as it can be printed on one line."""
    return name if re.fullmatch(r"[\w.\-]+", name) else json.dumps(name)


def key(where: str, name: str) -> str:
    return f"{where}[{json.dumps(name)}]"


class Verifier:
    """The checks of one checkpoint; each problem is one InputError line prefixed by the checkpoint's path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, problem: str) -> None:
        raise InputError(f"{self.source}: {problem}")

    def config_error(self, where: str, problem: str) -> None:
        self.fail(f"config.json {where}: {problem}")

    def check_object(self, value, schema: dict[str, Check], where: str) -> dict:
        """A JSON object with exactly the schema's fields, each of its type and range."""
        if type(value) is not dict:
            self.config_error(where, f"expected a JSON object, got {described(value)}")
        for field in schema:
            if field not in value:
                self.config_error(where, f"missing field {field!r} (expected fields: {', '.join(schema)})")
        for field in value:
            if field not in schema:
                self.config_error(where, f"unknown field {label(field)!r} (expected fields: {', '.join(schema)})")
        for field, (accepts, expected) in schema.items():
            if not accepts(value[field]):
                self.config_error(f"{where}.{field}", f"expected {expected}, got {described(value[field])}")
        return value

    # -- config.json ----------------------------------------------------------------------------------------

    def check_config(self, config: dict) -> dict:
        q = config.get("quantization_config")
        if type(q) is not dict:
            self.config_error("quantization_config", f"expected a JSON object, got {json_kind(q)}")
        version = q.get("format_version")
        if version == 1 and type(version) is int:
            self.fail(f"quantized checkpoint format version 1 was written by an older mambaquant; re-quantize the "
                      f"model (this mambaquant reads version {FORMAT_VERSION})")
        if type(version) is not int or version != FORMAT_VERSION:
            self.fail(f"quantized checkpoint format version {shown(version)} is not supported; this mambaquant "
                      f"reads version {FORMAT_VERSION}")
        self.check_object(config, CHECKPOINT, "(top level)")
        self.check_object(q, quant_config_schema(), "quantization_config")
        _, config_class = MODELS[config["model_class"]]
        self.check_object(config["model_config"], dataclass_schema(config_class, **MODEL_CONFIG_CHECKS),
                          "model_config")
        self.check_layout(q["layout"], q)
        return q

    def check_spec(self, spec, where: str, a_bits: int) -> QuantSpec:
        if a_bits == FULL_PRECISION:
            self.config_error(where, "an activation quantizer, but quantization_config.a_bits is 16 (activations "
                                     "not quantized)")
        self.check_object(spec, QUANT_SPEC, where)
        if spec["bits"] != a_bits:
            self.config_error(f"{where}.bits", f"{spec['bits']} bits, but quantization_config.a_bits is {a_bits}")
        try:
            spec = QuantSpec(**spec)
            ActivationQuantizer(spec)  # the granularity / dynamic / observer combination
        except InputError as e:
            self.config_error(where, str(e))
        return spec

    def check_layout(self, layout, q: dict) -> None:
        where = "quantization_config.layout"
        self.check_object(layout, LAYOUT, where)
        for name, entry in layout["linears"].items():
            at = key(f"{where}.linears", name)
            if type(entry) is dict and "float" in entry:
                self.check_object(entry, FLOAT_LINEAR, at)
                continue
            self.check_object(entry, QUANTIZED_LINEAR, at)
            if q["w_bits"] == FULL_PRECISION:
                self.config_error(at, "a quantized linear, but quantization_config.w_bits is 16 (weights not "
                                      "quantized)")
            if entry["bits"] != q["w_bits"]:
                self.config_error(f"{at}.bits", f"{entry['bits']} bits, but quantization_config.w_bits is "
                                                f"{q['w_bits']}")
            if entry["input"] is not None:
                self.check_spec(entry["input"], f"{at}.input", q["a_bits"])
        for site, ops in layout["sites"].items():
            at = key(f"{where}.sites", site)
            if type(ops) is not list:
                self.config_error(at, f"expected a list of ops, got {described(ops)}")
            for index, op in enumerate(ops):
                op_at = f"{at}[{index}]"
                kind = op.get("op") if type(op) is dict else None
                if type(op) is not dict:
                    self.config_error(op_at, f"expected a JSON object, got {json_kind(op)} {shown(op)}")
                if type(kind) is not str or kind not in SITE_OPS:
                    self.config_error(f"{op_at}.op", f"expected one of {', '.join(map(repr, SITE_OPS))}, got "
                                                     f"{shown(kind)}")
                self.check_object(op, SITE_OPS[kind], op_at)
                if kind == "quantize":
                    self.check_spec(op["spec"], f"{op_at}.spec", q["a_bits"])
        if len(set(layout["gate_scales"])) != len(layout["gate_scales"]):
            self.config_error(f"{where}.gate_scales", "a mixer is listed twice")
        for name, digest in layout["sha256"].items():
            if not SHA256[0](digest):
                self.config_error(key(f"{where}.sha256", name), f"expected {SHA256[1]}, got {shown(digest)}")

    # -- the bytes --------------------------------------------------------------------------------------------

    def check_hashes(self, tensors: dict[str, torch.Tensor], recorded: dict[str, str]) -> None:
        for name in recorded:
            if name not in tensors:
                self.fail(f"missing tensor {label(name)}: config.json records it, model.safetensors does not hold it "
                          "(the file is corrupted or was modified)")
        for name in tensors:
            if name not in recorded:
                self.fail(f"tensor {label(name)} in model.safetensors has no sha256 recorded in config.json (the "
                          "file was modified, or written by something else)")
        for name, digest in recorded.items():
            if tensor_sha256(tensors[name]) != digest:
                self.fail(f"tensor {label(name)} does not match its recorded sha256 (the file is corrupted or was "
                          "modified)")

    # -- against the model --------------------------------------------------------------------------------------

    def check_layer_count(self, n_layer: int, names) -> None:
        """Before building anything: a model_config's layer count that the tensors do not bear out."""
        layers = {int(m.group(1)) for name in names if (m := re.match(r"layers\.(\d+)\.", name))}
        if len(layers) != n_layer or layers and max(layers) != n_layer - 1:  # distinct, so: not exactly 0..n-1
            self.fail(f"model_config.n_layer is {n_layer}, but the tensors are those of "
                      f"{len(layers)} layer(s) ({', '.join(map(str, sorted(layers)[:4]))}"
                      f"{' ...' if len(layers) > 4 else ''}); expected layers 0 to {n_layer - 1}")

    def check_tensors(self, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
        for name in expected:
            if name not in tensors:
                self.fail(f"missing tensor {label(name)}, which this layout and model_config need")
        for name in tensors:
            if name not in expected:
                self.fail(f"unexpected tensor {label(name)}: this layout and model_config have no place for it")
        for name, want in expected.items():
            got = tensors[name]
            if got.dtype != want.dtype:
                self.fail(f"tensor {label(name)} has dtype {str(got.dtype).removeprefix('torch.')}, expected "
                          f"{str(want.dtype).removeprefix('torch.')}")
            if tuple(got.shape) != tuple(want.shape):
                self.fail(f"tensor {label(name)} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")

    def check_values(self, checks: list[tuple], tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                self.fail(f"tensor {label(name)} contains NaN or Inf; expected finite values")
        for kind, name, *info in checks:
            tensor = tensors.get(name)  # None for a Hadamard rotation, which has no tensor
            if kind == "codes":
                bits, shape = info
                self.check_codes(name, tensor, bits, shape)
            elif kind in ("scale", "gate_scale"):
                bad = tensor[~(tensor > 0)]
                if bad.numel():
                    what = "weight scales" if kind == "scale" else "S-SiLU smoothing scales"
                    self.fail(f"tensor {label(name)} ({what}) holds {bad.flatten()[0].item():g}; expected strictly "
                              "positive values")
            elif kind == "range":
                high_name, = info
                low, high = tensor, tensors[high_name]
                if (low > high).any():
                    i = int((low > high).flatten().nonzero()[0])
                    self.fail(f"activation range {label(name.removesuffix('.low'))} is not ordered: low "
                              f"{low.flatten()[i].item():g} > high {high.flatten()[i].item():g} (expected "
                              "low <= high)")
            elif kind == "rotation":
                matrix = tensor.double()
                error = (matrix @ matrix.T - torch.eye(len(matrix), dtype=torch.float64)).abs().max().item()
                if error >= ORTHOGONALITY_TOLERANCE:
                    self.fail(f"tensor {label(name)} is not an orthogonal matrix (max |R R^T - I| = {error:.3g}, "
                              f"expected < {ORTHOGONALITY_TOLERANCE:g})")
            elif kind == "hadamard":
                from ..transforms.hadamard import factor

                try:
                    factor(info[0])
                except InputError as e:
                    self.fail(f"the online Hadamard rotation at site {label(name)}: {e}")

    def check_codes(self, name: str, tensor: torch.Tensor, bits: int, shape: tuple[int, int]) -> None:
        qmax = 2 ** (bits - 1) - 1
        codes = unpack_int4(tensor, shape) if bits <= 4 else tensor
        bad = codes[(codes < -qmax) | (codes > qmax)]
        if bad.numel():
            self.fail(f"tensor {label(name)} holds the code {bad.flatten()[0].item()}, outside the int{bits} range "
                      f"[{-qmax}, {qmax}]")
        if bits <= 4 and (shape[0] * shape[1]) % 2 and int(tensor[-1] >> 4) != 8:
            self.fail(f"tensor {label(name)}: the padding nibble of its odd count of 4-bit codes is "
                      f"{int(tensor[-1] >> 4)}, expected 8 (the code 0)")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


class MetaDevice(TorchFunctionMode):
    """Modules built as shapes and dtypes only: on the meta device, allocating nothing, and with their random
    initialisation skipped (meaningless there, and meta `normal_` imports torch._dynamo: seconds per refusal)."""

    INITS = {getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")}
    INITS |= {torch.Tensor.normal_, torch.Tensor.uniform_}

    def __enter__(self):
        self.device = torch.device("meta")
        self.device.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.device.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INITS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def site_width(kind: str, c) -> int | None:
    widths = {"D": c.d_model, "E": c.d_inner, "N": c.d_state, "R": c.dt_rank,
              "K": c.num_classes if hasattr(c, "num_classes") else getattr(c, "vocab_size", None)}
    return widths.get(SITE_WIDTHS.get(kind))


def build_skeleton(config: dict, q: dict, verifier: Verifier) -> tuple[nn.Module, list[tuple]]:
    """The model the checkpoint describes, with its quantized modules in place and zeros everywhere; and the value
    checks its tensors need. Raises for anything in the layout this model has no place for."""
    model_class, config_class = MODELS[config["model_class"]]
    layout = q["layout"]
    try:
        model_config = config_class(**config["model_config"])
        model = model_class(model_config)
    except InputError:
        raise
    except (ValueError, RuntimeError, TypeError) as e:
        verifier.fail(f"config.json model_config does not describe a {model_class.__name__} "
                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    tied = isinstance(model, MambaLM) and model_config.tie_embeddings
    positions = model_config.num_patches + 1 if isinstance(model, VisionMamba) else None
    modules = dict(model.named_modules())
    checks = []

    def quantizer(spec: dict, where: str) -> ActivationQuantizer:
        module = ActivationQuantizer(QuantSpec(**spec))
        if module.spec.granularity == "position":
            if positions is None:
                verifier.config_error(where, f"per-position activation ranges need a fixed-length model "
                                             f"(VisionMamba), not a {model_class.__name__}")
            module.low, module.high = torch.zeros(positions), torch.zeros(positions)
        return module

    for name, entry in layout["linears"].items():
        at = key("quantization_config.layout.linears", name)
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            verifier.config_error(at, f"this {model_class.__name__} has no linear layer {label(name)}")
        owner_name, _, attribute = name.rpartition(".")
        owner = modules[owner_name] if owner_name else model
        if entry.get("float"):
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features))
            continue
        out_features, in_features = linear.out_features, linear.in_features
        if entry["shape"] != [out_features, in_features]:
            verifier.config_error(f"{at}.shape", f"{entry['shape']}, but model_config gives this linear the shape "
                                                 f"{[out_features, in_features]}")
        group = q["weight_group_size"]
        if group and in_features % group:
            verifier.config_error("quantization_config.weight_group_size", f"{group} does not divide the input "
                                                                           f"width {in_features} of {label(name)}")
        scale_shape = (out_features, in_features // group, 1) if group else (out_features, 1)
        input_quantizer = quantizer(entry["input"], f"{at}.input") if entry["input"] is not None else None
        module = QuantizedLinear(torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(scale_shape),
                                 torch.zeros(out_features) if entry["bias"] else None, entry["bits"], input_quantizer)
        setattr(owner, attribute, module)
        codes = f"{name}.codes_int4" if entry["bits"] <= 4 else f"{name}.codes"
        checks += [("codes", codes, entry["bits"], (out_features, in_features)), ("scale", f"{name}.scale")]
    sites = {module.name: module for module in model.modules() if isinstance(module, Site)}
    for site_name, ops in layout["sites"].items():
        at = key("quantization_config.layout.sites", site_name)
        site = sites.get(site_name)
        if site is None:
            verifier.config_error(at, f"this {model_class.__name__} has no site {label(site_name)}")
        width = site_width(site.kind, model_config)
        for index, op in enumerate(ops):
            if op["op"] == "rotate":
                if width is not None and op["size"] != width:
                    verifier.config_error(f"{at}[{index}].size", f"{op['size']}, but the tensor at this site has "
                                                                 f"{width} channels")
                append_op(site, Rotate(op["size"], torch.zeros(op["size"], op["size"]) if op["matrix"] else None))
            else:
                append_op(site, quantizer(op["spec"], f"{at}[{index}].spec"))
    for name in layout["gate_scales"]:
        mixer = modules.get(name)
        if not isinstance(mixer, MambaMixer):
            verifier.config_error(key("quantization_config.layout.gate_scales", name),
                                  f"this {model_class.__name__} has no mixer {label(name)}")
        mixer.gate_scale = torch.zeros(model_config.d_inner)
        checks.append(("gate_scale", f"{name}.gate_scale"))
    head_scale = site_ops(model.sites["norm_f"])[:1] if tied else []  # a tied head's input scale (fuse_norms)
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer):
            checks.append(("range", f"{name}.low", f"{name}.high"))
        elif isinstance(module, Rotate):
            if module.matrix is None:
                checks.append(("hadamard", re.sub(r"(^|\.)sites\.|\.op(\.\d+)?$", r"\1", name), module.size))
            elif not any(module is scale for scale in head_scale):
                checks.append(("rotation", f"{name}.matrix"))
    return model, checks


def expected_tensors(model: nn.Module, layout: dict) -> dict[str, torch.Tensor]:
    """The tensors the file must hold for this model (meta tensors: names, dtypes, shapes)."""
    expected = dict(model.state_dict())
    for name, entry in layout["linears"].items():
        if not entry.get("float") and entry["bits"] <= 4:
            out_features, in_features = entry["shape"]
            del expected[f"{name}.codes"]
            expected[f"{name}.codes_int4"] = torch.empty(packed_length(out_features, in_features), dtype=torch.uint8,
                                                         device="meta")
    if isinstance(model, MambaLM) and model.config.tie_embeddings:
        del expected["embedding.weight" if isinstance(model.lm_head, QuantizedLinear) else "lm_head.weight"]
    return expected


def build_quantized(config: dict, tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The model of a quantized checkpoint, verified (see the module's docstring) before the model is allocated:
    its architecture from the config, the quantized modules from the layout, then every tensor assigned."""
    from ..methods import QuantReport
    from .weights import assign_weights

    verifier = Verifier(source)
    q = verifier.check_config(config)
    layout = q["layout"]
    verifier.check_hashes(tensors, layout["sha256"])
    verifier.check_layer_count(config["model_config"]["n_layer"], tensors)
    with MetaDevice():
        skeleton, checks = build_skeleton(config, q, verifier)
    verifier.check_tensors(expected_tensors(skeleton, layout), tensors)
    verifier.check_values(checks, tensors)

    model, _ = build_skeleton(config, q, verifier)
    tensors = dict(tensors)
    for name, entry in layout["linears"].items():
        if not entry.get("float") and entry["bits"] <= 4:
            tensors[f"{name}.codes"] = unpack_int4(tensors.pop(f"{name}.codes_int4"), tuple(entry["shape"]))
    if isinstance(model, MambaLM) and model.config.tie_embeddings and isinstance(model.lm_head, QuantizedLinear):
        # the embedding is the head's matrix
        model.embedding.weight = nn.Parameter(torch.zeros_like(model.embedding.weight), requires_grad=False)
        tensors["embedding.weight"] = dequantize_weight(tensors["lm_head.codes"], tensors["lm_head.scale"])
    assign_weights(model, {k: (k, v) for k, v in tensors.items()}, source)
    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            module.batches = 1  # static ranges were calibrated before saving
    report_config = {k: v for k, v in q.items() if k not in ("format_version", "activation_sites", "transforms",
                                                             "layout")}
    model.quantization_report = QuantReport(report_config, q["transforms"], q["activation_sites"])
    return model.eval()
