"""Every method's recipe: (model-wide transforms, per-block transforms, head transforms). The walk runs the
model-wide ones before the first block, the per-block ones on each block in turn, the head ones after the last
block; each module of this package named after a method holds its own. `fp` quantizes nothing and transforms
nothing. A per-block transform may return, for some sites, the clusters of channels that share one static range
(Quamba2's groups); the walk calibrates those sites per cluster."""

from . import gptq, mambaquant, quamba, quamba2, quarot, rtn, smoothquant
from .stages import no_op

RECIPES = {
    "fp": (no_op, no_op, no_op),
    "rtn": rtn.RECIPE,
    "gptq": gptq.RECIPE,
    "smoothquant": smoothquant.RECIPE,
    "quarot": quarot.RECIPE,
    "quamba": quamba.RECIPE,
    "quamba2": quamba2.RECIPE,
    "mambaquant": mambaquant.RECIPE,
    "mambaquant+": mambaquant.RECIPE,  # the same transforms; what goes beyond the paper is in QuantConfig's options
}
