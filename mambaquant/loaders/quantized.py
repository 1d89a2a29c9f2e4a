"""Quantized checkpoints: config.json (the model config + a `quantization_config` block) and model.safetensors
(integer weight codes, 4-bit ones packed two per byte, their scales, activation ranges, rotation matrices,
smoothing vectors), written atomically; and their reloading into a model that runs exactly like the original."""


import torch
from torch import nn

from ..errors import InputError
from ..quant.linear import QuantizedLinear
from ..quant.quantizer import ActivationQuantizer, QuantSpec, dequantize_weight
from ..runtime import LMConfig, MambaLM, MambaTagger, Site, TaggerConfig, VisionConfig, VisionMamba
from ..transforms.rotation import Rotate, append_op

ARCHITECTURE = "mambaquant-quantized"
FORMAT_VERSION = 1
MODELS = {"MambaLM": (MambaLM, LMConfig), "VisionMamba": (VisionMamba, VisionConfig),
          "MambaTagger": (MambaTagger, TaggerConfig)}


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
    """The tensors to write and the layout that rebuilds the modules holding them."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    linears, sites = {}, {}
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
    tied = isinstance(model, MambaLM) and model.config.tie_embeddings
    if tied and isinstance(model.lm_head, QuantizedLinear):
        del tensors["embedding.weight"]  # it is the head's matrix: rebuilt from the head's codes
    return tensors, {"linears": linears, "sites": sites}


def build_quantized(config: dict, tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The model of a quantized checkpoint: its architecture from the config, the quantized modules from the
    layout, then every tensor assigned, with one clear error for anything that does not match."""
    from .weights import assign_weights

    version = config.get("quantization_config", {}).get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"{source}: quantized checkpoint format version {version!r} is not supported; "
                         f"this mambaquant reads version {FORMAT_VERSION}")
    try:
        model_class, config_class = MODELS[config["model_class"]]
        model = model_class(config_class.from_dict(config["model_config"]))
        layout = config["quantization_config"]["layout"]
        modules = dict(model.named_modules())
        for name, entry in layout["linears"].items():
            owner_name, _, attribute = name.rpartition(".")
            owner = modules[owner_name] if owner_name else model
            if entry.get("float"):
                linear = getattr(owner, attribute)
                linear.bias = nn.Parameter(torch.zeros(linear.out_features))
                continue
            out_features, in_features = entry["shape"]
            key = f"{name}.codes_int4" if entry["bits"] <= 4 else f"{name}.codes"
            if key not in tensors:
                raise InputError(f"{source}: missing tensor {key}")
            if entry["bits"] <= 4:
                tensors[f"{name}.codes"] = unpack_int4(tensors.pop(key), (out_features, in_features))
            quantizer = ActivationQuantizer(QuantSpec(**entry["input"])) if entry["input"] else None
            scale_shape = tensors.get(f"{name}.scale", torch.empty(out_features, 1)).shape
            linear = QuantizedLinear(torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(scale_shape),
                                     torch.zeros(out_features) if entry["bias"] else None, entry["bits"], quantizer)
            setattr(owner, attribute, linear)
        sites = {module.name: module for module in model.modules() if isinstance(module, Site)}
        for site_name, ops in layout["sites"].items():
            for op in ops:
                if op["op"] == "rotate":
                    append_op(sites[site_name], Rotate(op["size"], torch.zeros(op["size"], op["size"]) if op["matrix"]
                                                       else None))
                else:
                    append_op(sites[site_name], ActivationQuantizer(QuantSpec(**op["spec"])))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{source}: config.json does not describe a valid quantized model ({type(e).__name__}: "
                         f"{e})") from None
    for name, module in model.named_modules():
        if hasattr(module, "gate_scale") and f"{name}.gate_scale" in tensors:
            module.gate_scale = torch.zeros_like(tensors[f"{name}.gate_scale"])
    tied = isinstance(model, MambaLM) and model.config.tie_embeddings and isinstance(model.lm_head, QuantizedLinear)
    if tied:  # the embedding is the head's matrix
        model.embedding.weight = nn.Parameter(torch.zeros_like(model.embedding.weight), requires_grad=False)
        if "lm_head.codes" in tensors and "lm_head.scale" in tensors:
            tensors["embedding.weight"] = dequantize_weight(tensors["lm_head.codes"], tensors["lm_head.scale"].float())
    assign_weights(model, {k: (k, v) for k, v in tensors.items()}, source)
    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            module.batches = 1  # static ranges were calibrated before saving
    from ..methods import QuantReport

    q = config["quantization_config"]
    report_config = {k: v for k, v in q.items() if k not in ("format_version", "activation_sites", "transforms",
                                                             "layout")}
    model.quantization_report = QuantReport(report_config, q.get("transforms", []), q.get("activation_sites", {}))
    return model.eval()


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
