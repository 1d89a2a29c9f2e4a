"""The quantization methods, as recipes over the runtime's sites, and `quantize`, the one verb from a
full-precision model to a quantized one.

- `config`: `QuantConfig` (what a run is asked for), `QuantReport` (what it did where), the method names, presets
  and granularities;
- `pipeline`: `quantize`: a model source loaded, calibrated, walked, saved;
- `walk`: `run_recipe`, the block-by-block walk (calibration of activation quantizers, weight quantization),
  `set_backend` and the checks;
- `streamed`: the walk over a checkpoint read one block at a time (`loaders.streamed`), written as it goes;
- `granularity`: the activation granularity of each site, chosen for "auto" with its reason;
- `stages`: the `Runner` of one stage over the calibration inputs and the slots where quantizers go;
- `recipes`: `RECIPES`, every method's (model-wide, per-block, head) transforms, from the modules `rtn`,
  `smoothquant`, `quarot`, `gptq`, `quamba`, `quamba2` (Mamba-2 only) and `mambaquant`, each holding its recipe
  for both block kinds.
"""

from .config import (FULL_PRECISION, GRANULARITIES, MAMBA2_ONLY_METHODS, METHODS, PRESETS, QuantConfig,
                     QuantReport)
from .pipeline import quantize
from .stages import Runner, activation_sites, linear_slots
from .walk import methods_for, run_recipe, set_backend

__all__ = ["FULL_PRECISION", "GRANULARITIES", "MAMBA2_ONLY_METHODS", "METHODS", "PRESETS", "QuantConfig",
           "QuantReport", "Runner", "activation_sites", "linear_slots", "methods_for", "quantize",
           "run_recipe", "set_backend"]
