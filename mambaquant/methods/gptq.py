"""GPTQ: no transforms; the weights are rounded by GPTQ (its `WEIGHT_ROUNDING` in config.py, applied by
`quantize_linears` in walk.py)."""

from .stages import no_op

RECIPE = (no_op, no_op, no_op)
