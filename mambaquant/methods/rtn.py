"""Round-to-nearest (RTN): no transforms; weights rounded to nearest, activations at the configured granularity."""

from .stages import no_op

RECIPE = (no_op, no_op, no_op)
