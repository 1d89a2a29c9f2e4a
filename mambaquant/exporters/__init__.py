"""Exporters: a quantized (or full-precision) model handed to the engines people serve with, its integer codes
unchanged.

- `llama_cpp`: what llama.cpp executes, as rules that `quantize(..., target="llama.cpp")` follows and the GGUF
  exporter checks;
- `gguf`: `export_gguf`, the model as a GGUF file for llama.cpp (Q8_0 / Q4_0 blocks built from our codes).
"""
