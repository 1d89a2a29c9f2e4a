"""`export_compressed_tensors`: a model quantized with `target="vllm"` as the compressed-tensors checkpoint that vLLM
serves (and transformers loads with the compressed-tensors package), its integer codes and scales unchanged.

The directory holds config.json (transformers' config: `mamba2` for a Mamba-2 LM, `nemotron_h` for a hybrid of
Mamba-2, attention and MLP blocks, the head always written untied) with its `quantization_config` block, and
model.safetensors under transformers' tensor names. Each quantized linear is one of
- W8A8 (`int-quantized`): `weight` int8 codes, `weight_scale` (out, 1) per output channel, `input_scale` (1,) for
  a static per-tensor input (none for per-token dynamic inputs: vLLM computes them);
- W8A16 / W4A16 (`pack-quantized`): `weight_packed` int32 (32 / bits codes a word, code + 2^(bits-1), the first
  code in the lowest bits), `weight_scale` (out, 1) or (out, in / group), `weight_shape` (out, in).
`config_groups` names each quantized layer by an anchored regex under the scheme it has, `ignore` names the LM head.
An online Hadamard our walk left at out_proj's (or down_proj's) input is a `transform_config` input transform of
type `random-hadamard` (a dense matrix: vLLM's CPU build has no Hadamard kernel, and our Hadamard orders are not
all powers of two): its `weight` is sqrt(n) times our matrix M (x -> x M), which vLLM and compressed-tensors divide
by sqrt(n). Everything fused offline is already in the float tensors."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..outputs import check_output_dir, write_atomic_dir
from ..quant.linear import QuantizedLinear
from ..runtime import Mamba2LMConfig
from ..transforms.rotation import Rotate
from . import vllm
from .rules import summary

QUANT_METHOD = "compressed-tensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")
NEMOTRON_PATTERN = {"mamba2": "M", "attention": "*", "mlp": "-"}


def export_problems(model: nn.Module) -> list[str]:
    """Why this model cannot go to vLLM as a compressed-tensors checkpoint (empty: it can)."""
    if not hasattr(model, "quantization_report"):
        return ["a full-precision model (compressed-tensors holds a quantized one: quantize it with --target vllm)"]
    config = model.quantization_report.config
    if config.get("target") != vllm.ENGINE:
        return [f"a model quantized for target {config.get('target')} (vLLM executes a recipe of --target vllm only: "
                "quantize it with --target vllm)"]
    return vllm.architecture_problems(model) or vllm.execution_problems(model, config["w_bits"])


def export_compressed_tensors(model: nn.Module, out, tokenizer_dir=None, overwrite: bool = False,
                              sources=()) -> Path:
    """Write `model` (quantized with `target="vllm"`) into the directory `out`, atomically: everything is written
    into a temporary directory beside it and renamed at the end. `tokenizer_dir`: a directory whose tokenizer files
    are copied along. Refuses, in one line and before writing anything, a model vLLM would not run as we simulate
    it and an existing `out` without `overwrite`."""
    problems = export_problems(model)
    if problems:
        raise InputError(f"vLLM cannot serve this model as quantized: {summary(problems)}")
    out = check_output_dir(out, overwrite, sources)
    tensors, quantization_config = checkpoint_tensors(model)
    config = {**hf_config(model.config), "torch_dtype": "float32", "quantization_config": quantization_config}
    tokenizer_files = [Path(tokenizer_dir) / name for name in TOKENIZER_FILES
                       if tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file()]

    def write(staging: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in tokenizer_files:
            shutil.copyfile(path, staging / path.name)

    return write_atomic_dir(out, write, overwrite, kind="compressed-tensors", sources=sources)


def hf_name(name: str) -> str:
    """Our tensor name -> transformers' (Mamba2ForCausalLM and NemotronHForCausalLM share the layout)."""
    if name == "embedding.weight":
        return "backbone.embeddings.weight"
    if name.startswith("lm_head."):
        return name
    return "backbone." + name


def hf_config(c) -> dict:
    """transformers' config of the exported model: `mamba2`, or `nemotron_h` for a hybrid."""
    if isinstance(c, Mamba2LMConfig):
        from ..loaders.mamba2 import saved_config

        return {**saved_config(c), "tie_word_embeddings": False}
    blocks, m, a, p = c.blocks, c.mamba2, c.attention, c.mlp
    values = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "vocab_size": c.vocab_size,
              "hidden_size": c.d_model, "num_hidden_layers": len(blocks),
              "hybrid_override_pattern": "".join(NEMOTRON_PATTERN[kind] for kind in blocks),
              "layer_norm_epsilon": c.norm_eps, "residual_in_fp32": True, "tie_word_embeddings": False,
              "use_cache": True}
    if m is not None:
        values |= {"mamba_num_heads": m.n_heads, "mamba_head_dim": m.head_dim, "n_groups": m.n_groups,
                   "ssm_state_size": m.d_state, "conv_kernel": m.d_conv, "use_conv_bias": m.conv_bias,
                   "use_bias": m.bias, "mamba_proj_bias": m.bias, "chunk_size": m.chunk_size,
                   "expand": max(1, m.d_inner // c.d_model), "mamba_hidden_act": "silu",
                   "time_step_limit": [m.dt_limit_min, m.dt_limit_max or math.inf]}
    if a is not None:
        values |= {"num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
                   "attention_bias": False, "max_position_embeddings": 1 << 20}
    if p is not None:
        values |= {"intermediate_size": p.d_ff, "mlp_hidden_act": "relu2", "mlp_bias": p.bias}
    return values


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' pack-quantized words: 32 / bits codes per int32 along the input, each stored as
    code + 2^(bits-1), the first in the lowest bits."""
    per_word = 32 // bits
    rows, cols = codes.shape
    if cols % per_word:
        raise InputError(f"an input width of {cols} does not pack into int32 words of {per_word} codes")
    unsigned = (codes.to(torch.int64) + (1 << (bits - 1))).numpy().astype(np.uint64).reshape(rows, -1, per_word)
    shifts = (np.arange(per_word, dtype=np.uint64) * np.uint64(bits))
    words = np.bitwise_or.reduce(unsigned << shifts, axis=-1).astype(np.uint32)
    return torch.from_numpy(words.view(np.int32).copy())


def weight_args(linear: QuantizedLinear) -> dict:
    grouped = linear.scale.dim() == 3
    return {"num_bits": linear.bits, "type": "int", "symmetric": True,
            "group_size": linear.in_features // linear.scale.shape[1] if grouped else None,
            "strategy": "group" if grouped else "channel", "dynamic": False, "observer": "minmax"}


def input_args(linear: QuantizedLinear) -> dict | None:
    quantizer = linear.input_quantizer
    if quantizer is None:
        return None
    token = quantizer.spec.granularity == "token"
    return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
            "strategy": "token" if token else "tensor", "dynamic": token, "observer": None if token else "minmax"}


def linear_tensors(name: str, linear: QuantizedLinear) -> dict[str, torch.Tensor]:
    """One quantized linear's tensors in compressed-tensors' format (names relative to the layer)."""
    grouped = linear.scale.dim() == 3
    scale = (linear.scale.reshape(linear.out_features, -1) if grouped else linear.scale).float().contiguous()
    if linear.input_quantizer is not None:  # W8A8, int-quantized
        tensors = {"weight": linear.codes.to(torch.int8).contiguous(), "weight_scale": scale}
        if linear.input_quantizer.spec.granularity == "tensor":
            input_scale, _ = linear.input_quantizer.static_scale_and_zero()
            tensors["input_scale"] = input_scale.float().reshape(1).clone()
    else:  # weight-only, pack-quantized
        tensors = {"weight_packed": pack_int32(linear.codes, linear.bits), "weight_scale": scale,
                   "weight_shape": torch.tensor([linear.out_features, linear.in_features], dtype=torch.int64)}
    if linear.bias is not None:
        tensors["bias"] = linear.bias.detach().float().contiguous()
    return tensors


def transform_of(site) -> Rotate | None:
    ops = list(site.op) if isinstance(site.op, nn.Sequential) else [site.op]
    rotations = [op for op in ops if isinstance(op, Rotate)]
    return rotations[0] if rotations else None


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """model.safetensors' tensors under transformers' names, and the `quantization_config` block."""
    from ..methods.stages import block_linears

    quantized = {}  # our module name -> (linear, the site at its input)
    names = {id(module): name for name, module in model.named_modules()}
    for layer in model.layers:
        for owner, attribute, site in block_linears(layer):
            linear = getattr(owner, attribute)
            if isinstance(linear, QuantizedLinear):
                quantized[names[id(linear)]] = (linear, site)
    tensors = {}
    for name, tensor in model.state_dict().items():
        module, _, _ = name.rpartition(".")
        if any(name.startswith(prefix + ".") for prefix in quantized) or ".sites." in name or "gate_scale" in name:
            continue
        tensors[hf_name(name)] = tensor.detach().float().contiguous().clone()
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = model.lm_head.weight.detach().float().contiguous().clone()
    head_dims = {}
    schemes, transforms = {}, {}  # scheme key -> (args, [layer regexes]); transform key -> (matrix, [regexes])
    for name, (linear, site) in quantized.items():
        hf = hf_name(name)
        for part, tensor in linear_tensors(name, linear).items():
            tensors[f"{hf}.{part}"] = tensor
        pattern = "re:.*" + hf.removeprefix("backbone.").replace(".", r"\.") + "$"
        weights, inputs = weight_args(linear), input_args(linear)
        key = json.dumps([weights, inputs], sort_keys=True)
        schemes.setdefault(key, (weights, inputs, []))[2].append(pattern)
        rotate = transform_of(site) if site.kind in vllm.TRANSFORM_SITES else None
        if rotate is not None:
            if linear.bias is not None:
                raise InputError(f"vLLM cannot serve this model as quantized: an online transform at the input of "
                                 f"{name}, which has a bias (vLLM's input transforms take linears without one)")
            matrix = rotate.as_matrix().float()  # (size, size), applied per block of `size` inputs
            scheme = f"{vllm.TRANSFORM_SITES[site.kind]}_hadamard_{matrix.shape[0]}"
            head_dims[scheme] = None if rotate.size == linear.in_features else rotate.size
            if scheme in transforms and not torch.equal(transforms[scheme][0], matrix):
                raise InputError(f"{name}: its online transform differs from the other {site.kind} transforms of "
                                 "the model (vLLM holds one matrix per transform scheme)")
            transforms.setdefault(scheme, (matrix, []))[1].append(pattern)
            tensors[f"{hf}.{scheme}_input.weight"] = (matrix * math.sqrt(matrix.shape[0])).contiguous()
    config_groups, formats = {}, set()
    for index, (weights, inputs, targets) in enumerate(schemes.values()):
        fmt = "int-quantized" if inputs is not None else "pack-quantized"
        formats.add(fmt)
        config_groups[f"group_{index}"] = {"targets": targets, "weights": weights, "input_activations": inputs,
                                           "output_activations": None, "format": fmt}
    quantization_config = {
        "quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "config_groups": config_groups, "ignore": ["lm_head"],
        "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None}
    if transforms:
        quantization_config["transform_config"] = {"config_groups": {
            scheme: {"type": "random-hadamard", "randomize": False, "requires_grad": False, "head_dim": head_dims[scheme],
                     "precision": "torch.float32",
                     "apply": [{"targets": targets, "location": "input", "inverse": False, "ignore": []}]}
            for scheme, (_, targets) in transforms.items()}}
    return tensors, quantization_config
