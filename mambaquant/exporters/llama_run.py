"""A GGUF file run in llama.cpp through the llama-cpp-python bindings (the llama extra): the logits of every
position of a token sequence, greedy decoding, and llama.cpp's own quantizer. The tests and benchmarks use it to
hold an export to what llama.cpp computes.

`extra_buffers` is llama.cpp's `use_extra_bufts` (weights repacked for its AMX / repack kernels). It is off by
default: on this project's CPUs (Intel Xeon with AMX) llama.cpp 0.3.36's AMX matrix product crashes the process
(SIGSEGV) on every Q8_0 / Q4_0 Mamba file tried, llama.cpp's own quantizations included, and its generic path is
what every CPU without AMX runs."""

import ctypes
from pathlib import Path

import numpy as np

from ..errors import InputError


def bindings():
    try:
        import llama_cpp
    except ImportError:
        raise InputError("running a GGUF file needs llama-cpp-python: pip install torch==2.13.0 -e \".[llama]\"") \
            from None
    if not getattr(bindings, "quiet", False):  # llama.cpp logs every load to stderr: keep it for errors only
        bindings.log = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(bindings.log, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        bindings.quiet = True
    return llama_cpp


class LlamaCppModel:
    """A GGUF model loaded in llama.cpp with one sequence of up to `context` tokens."""

    def __init__(self, path, threads: int = 2, context: int = 4096, batch: int = 512, extra_buffers: bool = False):
        self.lib = lib = bindings()
        params = lib.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise InputError(f"{path}: llama.cpp could not load this GGUF file")
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        context_params = lib.llama_context_default_params()
        context_params.n_ctx, context_params.n_batch, context_params.n_ubatch = context, batch, batch
        context_params.n_threads = context_params.n_threads_batch = threads
        self.context = lib.llama_init_from_model(self.model, context_params)
        if not self.context:
            lib.llama_model_free(self.model)
            raise InputError(f"{path}: llama.cpp could not create a context for this model")
        self.batch_size = batch
        self.batch = lib.llama_batch_init(batch, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of `text` (no special tokens added)."""
        data = text.encode()
        tokens = (self.lib.llama_token * (len(data) + 8))()
        vocab = self.lib.llama_model_get_vocab(self.model)
        count = self.lib.llama_tokenize(vocab, data, len(data), tokens, len(tokens), False, False)
        if count < 0:
            raise RuntimeError("llama_tokenize failed")
        return list(tokens[:count])

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.context), True)

    def decode(self, tokens: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Feed `tokens` at positions from `start`; the logits of each (or of the last) as (n, vocab)."""
        outputs = []
        for offset in range(0, len(tokens), self.batch_size):
            chunk = tokens[offset:offset + self.batch_size]
            batch = self.batch
            batch.n_tokens = len(chunk)
            last = offset + len(chunk) == len(tokens)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i] = token, start + offset + i
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                batch.logits[i] = all_logits or (last and i == len(chunk) - 1)
            if self.lib.llama_decode(self.context, batch) != 0:
                raise RuntimeError("llama_decode failed")
            rows = len(chunk) if all_logits else int(last)
            if rows:
                logits = self.lib.llama_get_logits(self.context)
                outputs.append(np.ctypeslib.as_array(logits, shape=(rows, self.vocab_size)).copy())
        return np.concatenate(outputs)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """The logits at every position of `tokens` (n, vocab), from a fresh state."""
        self.reset()
        return self.decode(list(tokens), 0, all_logits=True)

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Prefill `prompt`, then decode `new_tokens` tokens one at a time, greedily."""
        self.reset()
        logits = self.decode(list(prompt), 0, all_logits=False)
        out = []
        for step in range(new_tokens):
            out.append(int(logits[-1].argmax()))
            logits = self.decode(out[-1:], len(prompt) + step, all_logits=False)
        return out

    def close(self) -> None:
        if self.context:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.context)
            self.lib.llama_model_free(self.model)
            self.context = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def llama_quantize(source: Path, out: Path, file_type: str, threads: int = 2) -> Path:
    """llama.cpp's own quantizer (`llama_model_quantize`) applied to a float GGUF: `file_type` Q8_0, Q4_0, Q4_K_M,
    ... (llama.cpp's names)."""
    lib = bindings()
    params = lib.llama_model_quantize_default_params()
    types = {"Q8_0": lib.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": lib.LLAMA_FTYPE_MOSTLY_Q4_0,
             "Q4_K_M": lib.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q4_K_S": lib.LLAMA_FTYPE_MOSTLY_Q4_K_S}
    if file_type not in types:
        raise InputError(f"unknown llama.cpp file type {file_type!r}; expected one of {', '.join(types)}")
    params.ftype, params.nthread = types[file_type], threads
    if lib.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {source}")
    return Path(out)
