"""Quantized checkpoints: config.json (the model config + a `quantization_config` block) and model.safetensors
(integer weight codes, 4-bit ones packed two per byte, their scales, activation ranges, rotation matrices,
smoothing vectors), written atomically; and their reloading into a model that runs exactly like the original.

A checkpoint is verified, not trusted. Loading checks, in this order, and refuses with one line at the first problem:
1. the format version;
2. every field of config.json against a schema (`CHECKPOINT`, `QUANT_CONFIG`, `LAYOUT`, `QUANT_SPEC`, the model
   config dataclass's own `schema`): JSON types (a boolean is a bool, an integer is not a bool, a float or a
   string), allowed values and ranges, no field missing, none unknown; then what the fields say of each other;
3. from the file's header, before any data is read: the tensors present against those whose sha256 config.json
   records (a rename is caught here), the layout against the model that `model_config` builds (on the meta device,
   allocating nothing): every linear and site it names exists, with the shapes and widths the config gives; then
   every tensor's name, dtype and shape against that model, and the memory to load it;
4. each tensor's bytes against the sha256 recorded for it at save (`tensor_sha256`: dtype, shape and raw data): a
   flipped bit or a swap is caught here;
5. the values: codes within their bit width's range, weight scales finite and positive, activation ranges finite
   and ordered, rotation matrices orthogonal, smoothing scales finite and positive, everything else finite.

Format version 2 (version 1 had no hashes and is refused): `quantization_config.layout` holds `linears`
({module: quantized {shape, bits, bias, input} or float {float, bias}}), `sites` ({site: [ops]}), `gate_scales`
(the mixers with an S-SiLU smoothing vector) and `sha256` ({tensor: hex digest}). A tied language model stores its
shared matrix once: as the head's codes when the head is quantized, as `embedding.weight` when it is not."""

import dataclasses
import hashlib
import re
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InputError
from ..methods.config import (CALIB_DTYPES, CLUSTER_DEFAULTS, ENGINE_GRANULARITY, FULL_PRECISION, GRANULARITIES,
                              KV_CACHE_SITES, METHODS, SCOPES, TARGETS, QuantReport)
from ..methods.stages import linear_slots
from ..quant.linear import QuantizedEmbedding, QuantizedLinear
from ..quant.quantizer import ACTIVATION_GRANULARITIES, OBSERVERS, ActivationQuantizer, QuantSpec
from ..runtime import (HybridLMConfig, LMConfig, Mamba2LMConfig, MambaLM, MambaMixer, MambaModel, MambaTagger,
                       ModelConfig, Site, TaggerConfig, VisionConfig, VisionMamba)
from ..runtime.config import LIMITS
from ..runtime.moe import experts_as_lists
from ..transforms.rotation import Rotate, append_op
from ..transforms.smoothing import Scale
from ..schema import (EXACT, Field, boolean, constant, display, integer, item, json_text, list_of, map_of, number, obj,
                     string, validate)
from .weights import Checkpoint, check_memory, dtype_name, on_meta_device

ARCHITECTURE = "mambaquant-quantized"
FORMAT_VERSION = 2
MODELS = {"MambaLM": (MambaLM, LMConfig), "Mamba2LM": (MambaLM, Mamba2LMConfig), "HybridLM": (MambaLM, HybridLMConfig),
          "VisionMamba": (VisionMamba, VisionConfig), "MambaTagger": (MambaTagger, TaggerConfig),
          "MambaModel": (MambaModel, ModelConfig)}
WEIGHT_ROUNDINGS = ("rtn", "gptq")
# quantization_config fields added within version 2
ADDED_FIELDS = {**{name: None for name in CLUSTER_DEFAULTS}, "calib_dtype": "float32", "clip_search": False,
                "act_order": False, "site_bits": {}, "granularity_reasons": {}, "clipping": {}, "weights": [],
                "target": "runtime", "scope": "all", "decide": False, "decisions": [], "kv_bits": FULL_PRECISION,
                "static_fallback": False, "static_ranges": [], "smooth": True}
REPORT_FIELDS = ("transforms", "activation_sites", "granularity_reasons", "clipping", "weights",
                 "decisions", "static_ranges")  # QuantReport's
# activation quantizer spec fields added within version 2
ADDED_SPEC_FIELDS = {"clip": 1.0, "half_scales": False, "full_range": False}
# a quantized linear's own weight group size (0: per output channel), recorded within version 2: before it, every
# linear had quantization_config.weight_group_size
# model_config fields added within version 2 (the composition of issue 16): an older checkpoint has their defaults
COMPOSITION = ("stem", "in_features", "seq_len", "cls_token", "pos_embed", "final_norm", "pooling", "head",
               "head_hidden", "head_act")
ADDED_MODEL_FIELDS = {"MambaLM": ("residual", "mixer_rms_eps"),
                      "VisionMamba": ("residual", "vocab_size", "mixer_rms_eps") + COMPOSITION,
                      "MambaTagger": ("residual", "img_size", "patch_size", "stride", "in_chans",
                                      "mixer_rms_eps") + COMPOSITION,
                      "MambaModel": ("mixer_rms_eps",)}
ORTHOGONALITY_TOLERANCE = 1e-3  # max |R R^T - I| of a stored rotation (float32 rounding is ~1e-6)
# Channel width of the tensor at each site kind (runtime/sites.py): D d_model, E d_inner, N d_state, R dt_rank,
# K the head's outputs, M an MLP head's hidden width
SITE_WIDTHS = {"embed": "D", "norm_f": "D", "hidden": "M", "residual": "D", "norm": "D", "out": "D", "logits": "K",
               "x": "E", "z": "E", "gate": "E", "out_proj_in": "E", "conv": "E", "x_proj_in": "E", "dt": "E",
               "hC": "E", "y": "E", "dt_low": "R", "B": "N", "C": "N", "dA": "N", "dBu": "N", "h": "N"}
# Mamba-2 mixer sites: S d_ssm, K the conv channels, G*N the B/C groups, H heads
MAMBA2_SITE_WIDTHS = {"z": "S", "xBC": "K", "x": "S", "B": "GN", "C": "GN", "dt": "H", "h": "N", "y": "S",
                      "gate": "S", "out_proj_in": "E"}
# The hybrids' layers: each site's width from its layer's config
LAYER_SITE_WIDTHS = {
    "attention": {"q": lambda a: a.n_heads * a.head_dim, "o_proj_in": lambda a: a.n_heads * a.head_dim,
                  "k": lambda a: a.n_kv_heads * a.head_dim, "v": lambda a: a.n_kv_heads * a.head_dim},
    "mlp": {"mlp_in": lambda m: m.d_model, "down_in": lambda m: m.d_ff},
    "moe": {"router_in": lambda m: m.d_model, "fc1_latent_in": lambda m: m.d_model,
            "expert_in": lambda m: m.expert_width, "fc2_latent_in": lambda m: m.latent_size,
            "expert_down_in": lambda m: m.d_ff},
}


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
    if isinstance(op, Scale):
        return {"op": "scale", "size": len(op.scale)}
    raise InputError(f"cannot save the op {type(op).__name__} at {where}")


class QuantizedParts:
    """The tensors and layout of a quantized model, collected part by part: the whole model at once (`save`), or
    each block as a streamed walk finishes it and then the rest (`add` with `skip`). Each part's tensors go to
    `sink` (the shard writer) as they are collected; the layout keeps each tensor's sha256."""

    def __init__(self, sink: Callable[[dict[str, torch.Tensor]], None]):
        self.sink = sink
        self.linears, self.sites, self.gate_scales, self.sha256 = {}, {}, [], {}

    def add(self, module: nn.Module, prefix: str = "", skip: str | None = None) -> None:
        """The tensors of `module` (named with `prefix`; names under `skip` left out)."""
        def kept(name: str) -> bool:
            return skip is None or not name.startswith(skip)

        tensors = {prefix + k: v.detach().contiguous() for k, v in module.state_dict().items() if kept(k)}
        for name, child in module.named_modules():
            if not kept(name + "."):
                continue
            full = prefix + name
            if isinstance(child, QuantizedLinear):
                quantizer = child.input_quantizer
                group = child.in_features // child.scale.shape[1] if child.scale.dim() == 3 else 0
                self.linears[full] = {"shape": list(child.codes.shape), "bits": child.bits, "group_size": group,
                                      "bias": child.bias is not None,
                                      "input": vars(quantizer.spec).copy() if quantizer is not None else None}
                if child.bits <= 4:
                    tensors[f"{full}.codes_int4"] = pack_int4(tensors.pop(f"{full}.codes"))
            elif isinstance(child, nn.Linear) and child.bias is not None:
                self.linears[full] = {"float": True, "bias": True}
            elif isinstance(child, Site) and child.op is not None:
                self.sites[child.name] = [describe_op(op, child.name) for op in site_ops(child)]
            elif isinstance(child, MambaMixer) and child.gate_scale is not None:
                self.gate_scales.append(full)
        if isinstance(module, MambaLM) and module.config.tie_embeddings:  # one matrix, stored once
            untie_for_saving(module, tensors)
        self.sha256.update({name: tensor_sha256(tensor) for name, tensor in tensors.items()})
        self.sink(tensors)

    def layout(self) -> dict:
        """In name order, so that a streamed walk and an in-memory save write the same config.json."""
        return {"linears": dict(sorted(self.linears.items())), "sites": dict(sorted(self.sites.items())),
                "gate_scales": sorted(self.gate_scales), "sha256": dict(sorted(self.sha256.items()))}


def untie_for_saving(model: MambaLM, tensors: dict[str, torch.Tensor]) -> None:
    if isinstance(model.lm_head, QuantizedLinear):
        if not isinstance(model.embedding, QuantizedEmbedding) or model.embedding.codes is not model.lm_head.codes:
            raise InputError("cannot save this model: its config ties the embedding to the quantized head, but "
                             "the embedding does not read the head's codes")
    elif model.lm_head.weight is model.embedding.weight:
        del tensors["lm_head.weight"]  # it is the embedding: re-tied on load
    else:
        raise InputError("cannot save this model: its config ties the head to the embedding, but the two hold "
                         "different matrices")


def quantized_config(model: nn.Module, layout: dict) -> dict:
    report = model.quantization_report
    if type(model) not in {model_class for model_class, _ in MODELS.values()}:
        raise InputError(f"cannot save a {type(model).__name__}; expected one of "
                         f"{', '.join(sorted({m.__name__ for m, _ in MODELS.values()}))}")
    model_class = {Mamba2LMConfig: "Mamba2LM", HybridLMConfig: "HybridLM"}.get(type(model.config), type(model).__name__)
    return {"architecture": ARCHITECTURE, "model_class": model_class,
            "model_config": model.config.to_dict(),
            "quantization_config": {"format_version": FORMAT_VERSION, **report.config,
                                    **{name: getattr(report, name) for name in REPORT_FIELDS}, "layout": layout}}


def model_card(config: dict, metrics: list[str]) -> str:
    q = config["quantization_config"]
    activations = "not quantized" if q["a_bits"] == 16 else f"int{q['a_bits']}, granularity {q['act_granularity']}"
    if q["target"] == "llama.cpp":
        activations = f"{q['target']}'s own (int8, dynamic, per 32 values)"
    lines = [f"# {config['model_class']} quantized with {q['method']}", "",
             f"- weights: int{q['w_bits']} ({q['weight_rounding']}), activations: {activations}"
             + (f", KV cache: int{q['kv_bits']} (dynamic, per position and head)" if q["kv_bits"] != FULL_PRECISION
                else ""),
             f"- format: mambaquant quantized checkpoint, version {q['format_version']} "
             "(load with `mambaquant.load(DIR)`)"]
    if q["target"] == "llama.cpp":
        lines.append(f"- target: {q['target']} (export: `mambaquant export DIR --to gguf --out MODEL.gguf`)")
    elif q["target"] == "vllm":
        lines.append("- target: vllm (export: `mambaquant export DIR --to compressed-tensors --out VLLM_DIR`)")
    lines += [f"- transforms: {t}" for t in q["transforms"]]
    lines += [f"- weights: {w}" for w in q["weights"]]
    lines += [f"- decided: {d}" for d in q["decisions"]]
    lines += [f"- static ranges: {line}" for line in q["static_ranges"]]
    lines += [f"- {m}" for m in metrics]
    sites = report_of(q).site_lines()
    if sites:
        lines += ["", "## Activation sites: what each got, and why", ""] + [f"- {line}" for line in sites]
    return "\n".join(lines) + "\n"


def report_of(q: dict) -> QuantReport:
    """The `QuantReport` a checked quantization_config records."""
    config = {k: v for k, v in q.items() if k not in ("format_version", "layout", *REPORT_FIELDS)}
    return QuantReport(config, **{name: q[name] for name in REPORT_FIELDS})


def is_quantized_config(config: dict) -> bool:
    return config.get("architecture") == ARCHITECTURE


# ---------------------------------------------------------------------------------------------------------------
# The config.json schema (mambaquant.schema)
# ---------------------------------------------------------------------------------------------------------------

BITS = integer(2, 8)
PERCENTILE = number(50, 100, above=True)
QUANT_SPEC = {"bits": BITS, "symmetric": boolean(), "granularity": string(*ACTIVATION_GRANULARITIES),
              "group_size": integer(1), "dynamic": boolean(), "observer": string(*OBSERVERS), "percentile": PERCENTILE,
              "clip": number(0, 1, above=True), "half_scales": boolean(), "full_range": boolean()}
QUANTIZED_LINEAR = {"shape": list_of(integer(1), min_items=2, max_items=2,
                                     text="[out_features, in_features], two positive integers"),
                    "bits": BITS, "group_size": integer(0), "bias": boolean(),
                    "input": Field("object", fields=QUANT_SPEC, nullable=True, text="a quantizer spec object")}
FLOAT_LINEAR = {"float": constant(True), "bias": constant(True)}
SITE_OPS = {"rotate": {"op": constant("rotate"), "size": integer(1), "matrix": boolean()},
            "quantize": {"op": constant("quantize"), "spec": obj(QUANT_SPEC)},
            "scale": {"op": constant("scale"), "size": integer(1)}}


def site_op(op: dict) -> dict:
    """A site op's schema, chosen by its "op"; for an unknown op, one that refuses it."""
    kind = op.get("op")
    return SITE_OPS[kind] if isinstance(kind, str) and kind in SITE_OPS else {"op": string(*SITE_OPS)}


LAYOUT = {"linears": map_of(obj(lambda entry: FLOAT_LINEAR if "float" in entry else QUANTIZED_LINEAR)),
          "sites": map_of(list_of(obj(site_op), text="a list of ops")),
          "gate_scales": list_of(string()),
          "sha256": map_of(Field("string", pattern="[0-9a-f]{64}", text="a sha256 digest (64 lowercase hex digits)"))}
BIT_WIDTHS = integer(2, 8, special=(FULL_PRECISION,))
QUANT_CONFIG = {"format_version": constant(FORMAT_VERSION), "method": string(*METHODS), "w_bits": BIT_WIDTHS,
                "a_bits": BIT_WIDTHS, "act_granularity": string(*GRANULARITIES, ENGINE_GRANULARITY),
                "observer": string(*OBSERVERS),
                "percentile": PERCENTILE, "weight_group_size": integer(0),
                "weight_rounding": string(*WEIGHT_ROUNDINGS), "alpha": number(), "token_outlier_ratio": number(0),
                "token_outlier_share": number(0, 1), "seed": integer(),
                "head_clusters": integer(1, 1024, nullable=True), "channel_clusters": integer(1, 1024, nullable=True),
                "calib_dtype": string(*CALIB_DTYPES), "clip_search": boolean(), "act_order": boolean(),
                "site_bits": map_of(BITS, text="an object of site kinds and bit widths"),
                "activation_sites": map_of(string(), text="an object of strings"), "transforms": list_of(string()),
                "granularity_reasons": map_of(string(), text="an object of strings"),
                "clipping": map_of(string(), text="an object of strings"), "weights": list_of(string()),
                "target": string(*TARGETS), "scope": string(*SCOPES), "decide": boolean(),
                "decisions": list_of(string()), "kv_bits": BIT_WIDTHS, "static_fallback": boolean(),
                "static_ranges": list_of(string()), "smooth": boolean(), "layout": obj(LAYOUT)}
CHECKPOINT = {"architecture": constant(ARCHITECTURE), "model_class": string(*MODELS), "model_config": obj(),
              "quantization_config": obj(QUANT_CONFIG)}
# model_config: the config dataclass's schema, bounded below only (the tensors bound the sizes; a model built in code
# may hold what a config file may not, e.g. a negative dt_offset)
MODEL_LIMITS = {**{name: (low, None) for name, (low, _) in LIMITS.items()}, "n_layer": (0, None),
                "dt_offset": (None, None)}


# ---------------------------------------------------------------------------------------------------------------
# Verifying
# ---------------------------------------------------------------------------------------------------------------


class Verifier:
    """The checks of one checkpoint; each problem is one InputError line prefixed by the checkpoint's path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, problem: str) -> None:
        raise InputError(f"{self.source}: {problem}")

    def config_error(self, where: str, problem: str) -> None:
        self.fail(f"config.json {where}: {problem}")

    # -- config.json ----------------------------------------------------------------------------------------

    def check_config(self, config: dict) -> dict:
        """config.json, checked -> its values (numbers as floats)."""
        q = config.get("quantization_config")
        if isinstance(q, dict):  # (anything else: the schema says what is wrong with it)
            self.check_version(q.get("format_version"))
            for name, default in ADDED_FIELDS.items():  # a checkpoint written before they existed has their default
                q.setdefault(name, default)
            for spec in layout_specs(q.get("layout")):
                for name, default in ADDED_SPEC_FIELDS.items():
                    spec.setdefault(name, default)
            for entry in layout_linears(q.get("layout")):
                if "float" not in entry:
                    entry.setdefault("group_size", q.get("weight_group_size"))
        where = f"{self.source}: config.json"
        config = validate(config, CHECKPOINT, where, wording=EXACT)
        config_class = MODELS[config["model_class"]][1]
        defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
        for name in ADDED_MODEL_FIELDS.get(config["model_class"], ()):
            config["model_config"].setdefault(name, defaults[name])
        if config_class is HybridLMConfig:  # checked as a hybrid-lm config.json is, each layer's config by its own
            HybridLMConfig.from_dict(config["model_config"], where=f"{where} model_config")
        else:
            config["model_config"] = validate(config["model_config"], config_class.schema(MODEL_LIMITS), where,
                                              "model_config.", EXACT)
        self.check_layout(config["quantization_config"])
        return config

    def check_version(self, version) -> None:
        if version == 1 and type(version) is int:
            self.fail(f"quantized checkpoint format version 1 was written by an older mambaquant; re-quantize the "
                      f"model (this mambaquant reads version {FORMAT_VERSION})")
        if type(version) is not int or version != FORMAT_VERSION:
            self.fail(f"quantized checkpoint format version {json_text(version)} is not supported; this mambaquant "
                      f"reads version {FORMAT_VERSION}")

    def check_layout(self, q: dict) -> None:
        """What the layout's entries say of quantization_config's bit widths, and of each other."""
        for name in CLUSTER_DEFAULTS:  # Quamba2's options: set for it, null for every other method
            if (q[name] is None) == (q["method"] == "quamba2"):
                self.config_error(f"quantization_config.{name}", f"{json_text(q[name])}, but the method is "
                                  f"{q['method']} (expected {'an integer' if q['method'] == 'quamba2' else 'null'})")
        layout, where = q["layout"], "quantization_config.layout"
        for name, entry in layout["linears"].items():
            at = item(f"{where}.linears", name)
            if "float" in entry:
                continue
            if q["w_bits"] == FULL_PRECISION:
                self.config_error(at, "a quantized linear, but quantization_config.w_bits is 16 (weights not "
                                      "quantized)")
            if entry["bits"] != q["w_bits"]:
                self.config_error(f"{at}.bits", f"{entry['bits']} bits, but quantization_config.w_bits is "
                                                f"{q['w_bits']}")
            if entry["input"] is not None:  # its bits are checked against its input site's in build_skeleton
                self.check_spec(entry["input"], f"{at}.input", q["a_bits"], None)
        for site, ops in layout["sites"].items():
            kind = site.rpartition(".")[2]
            for index, op in enumerate(ops):
                if op["op"] == "quantize":
                    at = f"{item(item(f'{where}.sites', site), index)}.spec"
                    if kind in KV_CACHE_SITES:  # the KV cache, at kv_bits whatever a_bits is
                        self.check_spec(op["spec"], at, q["kv_bits"], q["kv_bits"], "kv_bits")
                    else:
                        self.check_spec(op["spec"], at, q["a_bits"], activation_bits(q, kind))
        if len(set(layout["gate_scales"])) != len(layout["gate_scales"]):
            self.config_error(f"{where}.gate_scales", "a mixer is listed twice")

    def check_spec(self, spec: dict, where: str, a_bits: int, bits: int | None, field: str = "a_bits") -> None:
        """A quantizer spec at `where`, which should have `bits` (None: checked elsewhere); `a_bits` is the value
        of quantization_config's `field` that sets the bits there (kv_bits at the KV cache)."""
        if a_bits == FULL_PRECISION:
            self.config_error(where, f"an activation quantizer, but quantization_config.{field} is 16 (activations "
                                     "not quantized)")
        if bits is not None:
            self.check_bits(spec, where, bits, a_bits, field)
        try:
            ActivationQuantizer(QuantSpec(**spec))  # the granularity / dynamic / observer combination
        except InputError as e:
            self.config_error(where, str(e))

    def check_bits(self, spec: dict, where: str, bits: int, a_bits: int, field: str = "a_bits") -> None:
        if spec["bits"] != bits:
            source = "quantization_config.site_bits gives this site" if bits != a_bits else \
                f"quantization_config.{field} is"
            self.config_error(f"{where}.bits", f"{spec['bits']} bits, but {source} {bits}")

    # -- the bytes --------------------------------------------------------------------------------------------

    def check_recorded(self, names, recorded: dict[str, str]) -> None:
        """The tensors the file holds against those whose sha256 config.json records."""
        for name in recorded:
            if name not in names:
                self.fail(f"missing tensor {display(name)}: config.json records it, model.safetensors does not hold "
                          "it (the file is corrupted or was modified)")
        for name in names:
            if name not in recorded:
                self.fail(f"tensor {display(name)} in model.safetensors has no sha256 recorded in config.json (the "
                          "file was modified, or written by something else)")

    def check_hashes(self, tensors: dict[str, torch.Tensor], recorded: dict[str, str]) -> None:
        for name, digest in recorded.items():
            if tensor_sha256(tensors[name]) != digest:
                self.fail(f"tensor {display(name)} does not match its recorded sha256 (the file is corrupted or was "
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
                self.fail(f"missing tensor {display(name)}, which this layout and model_config need")
        for name in tensors:
            if name not in expected:
                self.fail(f"unexpected tensor {display(name)}: this layout and model_config have no place for it")
        for name, want in expected.items():
            got = tensors[name]
            if got.dtype != want.dtype:
                self.fail(f"tensor {display(name)} has dtype {dtype_name(got.dtype)}, expected "
                          f"{dtype_name(want.dtype)}")
            if tuple(got.shape) != tuple(want.shape):
                self.fail(f"tensor {display(name)} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")

    def check_values(self, checks: list[tuple], tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                self.fail(f"tensor {display(name)} contains NaN or Inf; expected finite values")
        for kind, name, *info in checks:
            tensor = tensors.get(name)  # None for a Hadamard rotation, which has no tensor
            if kind == "codes":
                bits, shape = info
                self.check_codes(name, tensor, bits, shape)
            elif kind in ("scale", "gate_scale", "smoothing"):
                bad = tensor[~(tensor > 0)]
                if bad.numel():
                    what = {"scale": "weight scales", "gate_scale": "S-SiLU smoothing scales",
                            "smoothing": "online smoothing scales"}[kind]
                    self.fail(f"tensor {display(name)} ({what}) holds {bad.flatten()[0].item():g}; expected strictly "
                              "positive values")
            elif kind == "range":
                high_name, = info
                low, high = tensor, tensors[high_name]
                if (low > high).any():
                    i = int((low > high).flatten().nonzero()[0])
                    self.fail(f"activation range {display(name.removesuffix('.low'))} is not ordered: low "
                              f"{low.flatten()[i].item():g} > high {high.flatten()[i].item():g} (expected "
                              "low <= high)")
            elif kind == "rotation":
                matrix = tensor.double()
                error = (matrix @ matrix.T - torch.eye(len(matrix), dtype=torch.float64)).abs().max().item()
                if error >= ORTHOGONALITY_TOLERANCE:
                    self.fail(f"tensor {display(name)} is not an orthogonal matrix (max |R R^T - I| = {error:.3g}, "
                              f"expected < {ORTHOGONALITY_TOLERANCE:g})")
            elif kind == "hadamard":
                from ..transforms.hadamard import factor

                try:
                    factor(info[0])
                except InputError as e:
                    self.fail(f"the online Hadamard rotation at site {display(name)}: {e}")

    def check_codes(self, name: str, tensor: torch.Tensor, bits: int, shape: tuple[int, int]) -> None:
        qmax = 2 ** (bits - 1) - 1
        codes = unpack_int4(tensor, shape) if bits <= 4 else tensor
        bad = codes[(codes < -qmax) | (codes > qmax)]
        if bad.numel():
            self.fail(f"tensor {display(name)} holds the code {bad.flatten()[0].item()}, outside the int{bits} range "
                      f"[{-qmax}, {qmax}]")
        if bits <= 4 and (shape[0] * shape[1]) % 2 and int(tensor[-1] >> 4) != 8:
            self.fail(f"tensor {display(name)}: the padding nibble of its odd count of 4-bit codes is "
                      f"{int(tensor[-1] >> 4)}, expected 8 (the code 0)")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def activation_bits(q: dict, kind: str) -> int:
    return q["site_bits"].get(kind, q["a_bits"])


def layout_linears(layout) -> list[dict]:
    """The linear entries of a layout not yet validated (whatever in it is not an entry is skipped)."""
    linears = layout.get("linears") if isinstance(layout, dict) else None
    return [entry for entry in linears.values() if isinstance(entry, dict)] if isinstance(linears, dict) else []


def layout_specs(layout) -> list[dict]:
    """The activation quantizer specs of a layout not yet validated (whatever in it is not a spec is skipped)."""
    if not isinstance(layout, dict):
        return []
    linears, sites = layout.get("linears"), layout.get("sites")
    specs = [entry.get("input") for entry in linears.values() if isinstance(entry, dict)] \
        if isinstance(linears, dict) else []
    if isinstance(sites, dict):
        specs += [op.get("spec") for ops in sites.values() if isinstance(ops, list) for op in ops
                  if isinstance(op, dict) and op.get("op") == "quantize"]
    return [spec for spec in specs if isinstance(spec, dict)]


def site_width(site: Site, owner: nn.Module, c) -> int | None:
    """The channels of the tensor at `site` (held by `owner`, in a model of config `c`); None where it varies."""
    table = site.table
    if table == "mamba2":
        m = owner.config
        widths = {"S": m.d_ssm, "K": m.conv_dim, "GN": m.n_groups * m.d_state, "H": m.n_heads, "N": m.d_state,
                  "E": m.d_inner}
        return widths[MAMBA2_SITE_WIDTHS[site.kind]]
    if table in LAYER_SITE_WIDTHS:
        return LAYER_SITE_WIDTHS[table][site.kind](owner.config)
    if table != "mamba1":  # Zamba2's
        return None
    if isinstance(c, HybridLMConfig):  # a Mamba-1 layer's sites take its config, the block's and model's d_model
        c = c if site.kind in ("embed", "norm_f", "logits", "residual", "norm", "out") else c.mamba1
        widths = {"D": c.d_model, "K": getattr(c, "vocab_size", None)}
        if c is not None and hasattr(c, "d_inner"):
            widths.update({"E": c.d_inner, "N": c.d_state, "R": c.dt_rank})
        return widths.get(SITE_WIDTHS.get(site.kind))
    widths = {"D": c.d_model, "E": c.d_inner, "N": c.d_state, "R": getattr(c, "dt_rank", None),
              "M": getattr(c, "head_hidden", None),
              "K": c.num_classes if hasattr(c, "num_classes") else getattr(c, "vocab_size", None)}
    return widths.get(SITE_WIDTHS.get(site.kind))


def build_skeleton(config: dict, q: dict, verifier: Verifier) -> tuple[nn.Module, list[tuple]]:
    """The model the checkpoint describes, with its quantized modules in place and zeros everywhere; and the value
    checks its tensors need. Raises for anything in the layout this model has no place for."""
    model_class, config_class = MODELS[config["model_class"]]
    layout = q["layout"]
    try:
        model_config = HybridLMConfig.from_dict(config["model_config"]) if config_class is HybridLMConfig else \
            config_class(**config["model_config"])
        model = model_class(model_config)
        experts_as_lists(model)
    except InputError:
        raise
    except (ValueError, RuntimeError, TypeError) as e:
        verifier.fail(f"config.json model_config does not describe a {model_class.__name__} "
                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    tied = isinstance(model, MambaLM) and model_config.tie_embeddings
    positions = getattr(model, "fixed_positions", None)
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    input_kinds = {names[getattr(owner, attribute)]: site.kind for owner, attribute, site in linear_slots(model)}
    checks = []

    def quantizer(spec: dict, where: str, width: int | None = None) -> ActivationQuantizer:
        module = ActivationQuantizer(QuantSpec(**spec))
        if module.spec.granularity == "position":
            if positions is None:
                verifier.config_error(where, f"per-position activation ranges need a fixed-length model, not "
                                             f"this {model_class.__name__}")
            module.low, module.high = torch.zeros(positions), torch.zeros(positions)
        elif module.spec.granularity == "channel":
            if width is None:
                verifier.config_error(where, "per-channel activation ranges belong at a site, not at a linear input")
            module.low, module.high = torch.zeros(width), torch.zeros(width)
        return module

    for name, entry in layout["linears"].items():
        at = item("quantization_config.layout.linears", name)
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            verifier.config_error(at, f"this {model_class.__name__} has no linear layer {display(name)}")
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
        group, requested = entry["group_size"], q["weight_group_size"]
        if group and in_features % group:
            verifier.config_error(f"{at}.group_size", f"{group} does not divide the input width {in_features} of "
                                                      f"{display(name)}")
        expected = requested if requested and in_features % requested == 0 else 0  # QuantConfig.weight_spec's rule
        if group != expected:
            verifier.config_error(f"{at}.group_size", f"{group}, but quantization_config.weight_group_size {requested} "
                                  f"gives this linear {f'groups of {expected}' if expected else 'per-channel scales'}")
        scale_shape = (out_features, in_features // group, 1) if group else (out_features, 1)
        input_quantizer = None
        if entry["input"] is not None:
            if name not in input_kinds:
                verifier.config_error(f"{at}.input", f"{display(name)} is not a linear layer mambaquant quantizes")
            verifier.check_bits(entry["input"], f"{at}.input", activation_bits(q, input_kinds[name]), q["a_bits"])
            input_quantizer = quantizer(entry["input"], f"{at}.input")
        module = QuantizedLinear(torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(scale_shape),
                                 torch.zeros(out_features) if entry["bias"] else None, entry["bits"], input_quantizer)
        setattr(owner, attribute, module)
        codes = f"{name}.codes_int4" if entry["bits"] <= 4 else f"{name}.codes"
        checks += [("codes", codes, entry["bits"], (out_features, in_features)), ("scale", f"{name}.scale")]
    sites = {module.name: module for module in model.modules() if isinstance(module, Site)}
    owners = {site: module for module in model.modules() if isinstance(getattr(module, "sites", None), nn.ModuleDict)
              for site in module.sites.values()}
    for site_name, ops in layout["sites"].items():
        at = item("quantization_config.layout.sites", site_name)
        site = sites.get(site_name)
        if site is None:
            verifier.config_error(at, f"this {model_class.__name__} has no site {display(site_name)}")
        width = site_width(site, owners[site], model_config)
        for index, op in enumerate(ops):
            if op["op"] == "rotate":  # a rotation in blocks (Mamba-2's groups, the attention's heads) divides the width
                head = owners[site].config.head_dim if site.table == "attention" else None
                if width is not None and (width % op["size"] or op["size"] not in (width, head)
                                          and site.table != "mamba2"):
                    verifier.config_error(f"{at}[{index}].size", f"{op['size']}, but the tensor at this site has "
                                                                 f"{width} channels")
                append_op(site, Rotate(op["size"], torch.zeros(op["size"], op["size"]) if op["matrix"] else None))
            elif op["op"] == "scale":
                if op["size"] != width:
                    verifier.config_error(f"{at}[{index}].size", f"{op['size']}, but the tensor at this site has "
                                                                 f"{width} channels")
                append_op(site, Scale(torch.zeros(op["size"])))
            else:
                append_op(site, quantizer(op["spec"], f"{at}[{index}].spec", width))
    for name in layout["gate_scales"]:
        mixer = modules.get(name)
        if not isinstance(mixer, MambaMixer):
            verifier.config_error(item("quantization_config.layout.gate_scales", name),
                                  f"this {model_class.__name__} has no mixer {display(name)}")
        mixer.gate_scale = torch.zeros(mixer.d_inner)
        checks.append(("gate_scale", f"{name}.gate_scale"))
    # a tied head's input scale, or the product turning a max-pooled head's input back with the final norm's
    # scale in it (fuse_norms, rotate_residual): not orthogonal
    max_pooled = getattr(model_config, "pooling", None) == "max"
    head_scale = site_ops(model.sites["norm_f"])[:1] if tied or max_pooled else []
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer):
            checks.append(("range", f"{name}.low", f"{name}.high"))
        elif isinstance(module, Scale):
            checks.append(("smoothing", f"{name}.scale"))
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


def build_quantized(config: dict, checkpoint: Checkpoint, source: str) -> nn.Module:
    """The model of a quantized checkpoint, verified (see the module's docstring) before its data is read and the
    model allocated: its architecture from the config, the quantized modules from the layout, then every tensor
    assigned."""
    verifier = Verifier(source)
    config = verifier.check_config(config)
    q = config["quantization_config"]
    layout = q["layout"]
    verifier.check_recorded(checkpoint.infos, layout["sha256"])
    model_config = config["model_config"]
    verifier.check_layer_count(len(model_config["blocks"]) if "blocks" in model_config else model_config["n_layer"],
                               checkpoint.infos)
    with on_meta_device():
        skeleton, checks = build_skeleton(config, q, verifier)
    verifier.check_tensors(expected_tensors(skeleton, layout), checkpoint.infos)
    check_memory(skeleton, checkpoint.nbytes, source)
    tensors = checkpoint.read()
    verifier.check_hashes(tensors, layout["sha256"])
    verifier.check_values(checks, tensors)

    # the verified tensors become the model's own (assigned, not copied), so no float weight is ever allocated
    model = skeleton
    unpacked = set()
    for name, entry in layout["linears"].items():
        if not entry.get("float") and entry["bits"] <= 4:
            tensors[f"{name}.codes"] = unpack_int4(tensors.pop(f"{name}.codes_int4"), tuple(entry["shape"]))
            unpacked.add(f"{name}.codes")
    if unpacked:  # the file's mapping would keep the packed codes resident beside the unpacked ones: let it go
        tensors = {name: t if name in unpacked else t.clone() for name, t in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)  # check_tensors matched the names, dtypes and shapes
    if isinstance(model, MambaLM) and model.config.tie_embeddings:
        if isinstance(model.lm_head, QuantizedLinear):
            model.embedding = QuantizedEmbedding(model.lm_head)
        else:
            model.lm_head.weight = model.embedding.weight
    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            module.batches = 1  # static ranges were calibrated before saving
    model.quantization_report = report_of(q)
    return model.eval()
