"""`export_gguf`: a Mamba-1 / FalconMamba / Mamba-2 language model as a GGUF file that llama.cpp runs, with the
quantized matrices as Q8_0 / Q4_0 blocks built from our integer codes, unchanged.

A Q8_0 block is a float16 scale d and 32 int8 codes; a Q4_0 block a float16 scale and 32 codes in 16 bytes (byte j
holds code j + 8 in its low nibble and code j + 16 + 8 in its high one); a value is d times its code. Our symmetric
codes ([-127, 127], [-7, 7]) times a scale per output channel, or per group of a multiple of 32 inputs, are such
blocks as soon as the scale is a float16 (`--target llama.cpp` quantizes with float16 scales). What llama.cpp keeps
in float (conv1d, A, D, the norms, dt_proj where its input width is not a multiple of 32, a float embedding) is
written as F32, so a full-precision export computes what our runtime does. Tensor names and shapes follow
llama.cpp's `mamba` / `mamba2` architectures (its convert_hf_to_gguf.py and llama-model.cpp)."""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..outputs import check_output_file, write_atomic_file
from ..quant.linear import QuantizedEmbedding, QuantizedLinear
from ..runtime import Mamba2LMConfig, MambaLM
from . import llama_cpp
from .rules import summary

CONTEXT_LENGTH = 2**20  # llama.cpp's converter writes this for Mamba models: the recurrence has no context limit


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("GGUF export needs the gguf package: pip install gguf (or the project's llama extra: "
                         "pip install torch==2.13.0 -e \".[llama]\")") from None
    return gguf


def export_problems(model: nn.Module) -> list[str]:
    """Why this model cannot go to llama.cpp as it is (empty: it can)."""
    problems = llama_cpp.architecture_problems(model)
    if not problems and hasattr(model, "quantization_report"):
        problems = llama_cpp.execution_problems(model)
    return problems


def export_gguf(model: nn.Module, path, tokenizer: str | Path | None = None, name: str = "mambaquant",
                overwrite: bool = False) -> Path:
    """Write `model` (a full-precision `MambaLM`, or one quantized with `target="llama.cpp"`) to the GGUF file
    `path`, atomically. `tokenizer`: a tokenizer.json written as llama.cpp's BPE vocabulary (a byte-level model
    of 256 tokens is written without one: llama.cpp then takes token ids). Refuses, in one line, a model with parts
    llama.cpp does not run, and an existing `path` without `overwrite`."""
    gguf = require_gguf()
    problems = export_problems(model)
    if problems:
        hint = "; quantize it with --target llama.cpp (target=\"llama.cpp\")" if hasattr(model, "quantization_report") \
            else ""
        raise InputError(f"llama.cpp cannot run this model: {summary(problems)}{hint}")
    path = Path(check_output_file(path))
    if path.suffix != ".gguf":
        raise InputError(f"{path}: expected a file name ending in .gguf")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    c = model.config
    mamba2 = isinstance(c, Mamba2LMConfig)
    arch = "mamba2" if mamba2 else "mamba"
    w_bits = model.quantization_report.config["w_bits"] if hasattr(model, "quantization_report") else None
    tensors = list(model_tensors(model, gguf))

    def write(temporary: Path) -> None:
        writer = gguf.GGUFWriter(temporary, arch)
        writer.add_name(name)
        writer.add_context_length(CONTEXT_LENGTH)
        writer.add_embedding_length(c.d_model)
        writer.add_feed_forward_length(0)
        writer.add_head_count(0)
        writer.add_block_count(c.n_layer)
        writer.add_ssm_conv_kernel(c.d_conv)
        writer.add_ssm_inner_size(c.d_inner)
        writer.add_ssm_state_size(c.d_state)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        if mamba2:
            writer.add_ssm_time_step_rank(c.n_heads)
            writer.add_ssm_group_count(c.n_groups)
        else:
            writer.add_ssm_time_step_rank(c.dt_rank)
            writer.add_ssm_dt_b_c_rms(bool(c.mixer_rms_eps))
        file_types = {None: gguf.LlamaFileType.ALL_F32, 8: gguf.LlamaFileType.MOSTLY_Q8_0,
                      4: gguf.LlamaFileType.MOSTLY_Q4_0}
        writer.add_file_type(file_types[w_bits])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocabulary(writer, gguf, c.vocab_size, tokenizer)
        for tensor_name, data, raw_dtype in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomic_file(path, write)


def model_tensors(model: MambaLM, gguf):
    """(GGUF name, numpy data, quantization type or None) for every tensor llama.cpp reads."""
    mamba2 = isinstance(model.config, Mamba2LMConfig)
    if isinstance(model.embedding, QuantizedEmbedding):  # a tied head: its codes are the embedding too
        yield ("token_embd.weight", *matrix(model.lm_head, gguf))
    else:
        yield "token_embd.weight", as_f32(model.embedding.weight), None
        if not (isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embedding.weight):
            yield ("output.weight", *matrix(model.lm_head, gguf))
    yield "output_norm.weight", as_f32(model.norm_f.weight), None
    for i, layer in enumerate(model.layers):
        mixer = layer.mixer
        block = f"blk.{i}."
        conv = mixer.conv1d if mamba2 else mixer.ssm.conv1d
        yield block + "attn_norm.weight", as_f32(layer.norm.weight), None
        yield (block + "ssm_in.weight", *matrix(mixer.in_proj, gguf))
        yield block + "ssm_conv1d.weight", as_f32(conv.weight[:, 0, :]), None
        yield block + "ssm_conv1d.bias", as_f32(conv.bias if conv.bias is not None else torch.zeros(len(conv.weight))), \
            None
        if mamba2:
            yield block + "ssm_dt.bias", as_f32(mixer.dt_bias), None
            yield block + "ssm_a", as_f32(-torch.exp(mixer.A_log.float())[:, None]), None
            yield block + "ssm_d", as_f32(mixer.D[:, None]), None
            c = mixer.config
            yield block + "ssm_norm.weight", as_f32(mixer.norm.weight.view(c.n_groups, -1)), None
        else:
            ssm = mixer.ssm
            yield (block + "ssm_x.weight", *matrix(ssm.x_proj, gguf))
            yield (block + "ssm_dt.weight", *matrix(ssm.dt_proj, gguf))
            yield block + "ssm_dt.bias", as_f32(ssm.dt_proj.bias), None
            yield block + "ssm_a", as_f32(-torch.exp(ssm.A_log.float())), None
            yield block + "ssm_d", as_f32(ssm.D), None
        yield (block + "ssm_out.weight", *matrix(mixer.out_proj, gguf))


def as_f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().contiguous().numpy()


def matrix(linear: nn.Module, gguf) -> tuple[np.ndarray, object]:
    """A linear layer's weight: F32, or Q8_0 / Q4_0 blocks of its codes."""
    if not isinstance(linear, QuantizedLinear):
        return as_f32(linear.weight), None
    scales = block_scales(linear)
    if linear.bits == 8:
        return q8_0_blocks(linear.codes, scales), gguf.GGMLQuantizationType.Q8_0
    return q4_0_blocks(linear.codes, scales), gguf.GGMLQuantizationType.Q4_0


def block_scales(linear: QuantizedLinear) -> torch.Tensor:
    """The float16 scale of each block of 32 inputs of each row (out, in / 32), from per-channel or per-group
    scales (already float16 values: `llama_cpp.execution_problems` checked)."""
    blocks = linear.in_features // llama_cpp.BLOCK
    per_block = linear.scale.reshape(linear.out_features, -1)
    return per_block.repeat_interleave(blocks // per_block.shape[1], dim=1).half()


def q8_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Rows of Q8_0 blocks: (out, in / 32 * 34) bytes, each block a float16 scale then 32 int8 codes."""
    out_features = codes.shape[0]
    d = scales.numpy().view(np.uint8).reshape(out_features, -1, 2)
    q = codes.numpy().view(np.uint8).reshape(out_features, -1, llama_cpp.BLOCK)
    return np.concatenate([d, q], axis=-1).reshape(out_features, -1)


def q4_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Rows of Q4_0 blocks: (out, in / 32 * 18) bytes, each block a float16 scale then 16 bytes, byte j holding
    code j + 8 (low nibble) and code j + 16 + 8 (high nibble)."""
    out_features = codes.shape[0]
    d = scales.numpy().view(np.uint8).reshape(out_features, -1, 2)
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8).numpy().reshape(out_features, -1, 2, 16)
    packed = nibbles[:, :, 0, :] | (nibbles[:, :, 1, :] << 4)
    return np.concatenate([d, packed], axis=-1).reshape(out_features, -1)


def add_vocabulary(writer, gguf, vocab_size: int, tokenizer: str | Path | None) -> None:
    """A byte-level model (or one whose tokenizer is not given) as llama.cpp's vocabulary-free model of
    `vocab_size` token ids; else the tokenizer.json's byte-level BPE as llama.cpp's `gpt2` tokenizer, padded to
    the model's vocabulary (GPT-NeoX's pre-tokenizer is llama.cpp's `mpt`)."""
    if tokenizer is None:
        writer.add_tokenizer_model("none")
        writer.add_vocab_size(vocab_size)
        return
    from ..schema import read_json

    spec = read_json(Path(tokenizer), "a tokenizer.json")
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise InputError(f"{tokenizer}: expected a byte-level BPE tokenizer.json (model type BPE with a vocab)")
    names = {index: token for token, index in model["vocab"].items()}
    special = {}
    for added in spec.get("added_tokens", []):
        names[added["id"]] = added["content"]
        if added.get("special"):
            special[added["id"]] = added["content"]
    if max(names) >= vocab_size:
        raise InputError(f"{tokenizer}: token id {max(names)} is outside the model's {vocab_size}-token vocabulary")
    tokens, types = [], []
    for index in range(vocab_size):
        tokens.append(names.get(index, f"[PAD{index}]"))
        types.append(gguf.TokenType.CONTROL if index in special else
                     gguf.TokenType.NORMAL if index in names else gguf.TokenType.UNUSED)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("mpt")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    end = next((index for index, text in special.items() if text == "<|endoftext|>"), None)
    if end is not None:
        writer.add_bos_token_id(end)
        writer.add_eos_token_id(end)
