"""Exporters: a quantized (or full-precision) model handed to the engines people serve with, its integer codes
unchanged.

- `llama_cpp`: what llama.cpp executes, as rules that `quantize(..., target="llama.cpp")` follows and the GGUF
  exporter checks;
- `gguf`: `export_gguf`, the model as a GGUF file for llama.cpp (Q8_0 / Q4_0 blocks built from our codes);
- `vllm`: what vLLM executes (its quantized linears, int8 inputs static per tensor or per token, online input
  transforms at out_proj / down_proj), as rules that `quantize(..., target="vllm")` follows and the
  compressed-tensors exporter checks;
- `compressed_tensors`: `export_compressed_tensors`, the model as the compressed-tensors checkpoint vLLM serves;
- `rules`: what both engines' rules share (the walk collecting what an engine does not execute, its one line).
"""
