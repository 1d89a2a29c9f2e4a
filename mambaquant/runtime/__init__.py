"""Our own Mamba-1 runtime: explicit modules, every quantizable tensor at a named site."""

from .block import MambaBlock, RMSNorm
from .config import LMConfig, MambaConfig, TaggerConfig, VisionConfig
from .init import init_weights
from .lm import MambaLM
from .mixer import MambaMixer, SelectiveSSM, SSMState
from .scan import selective_scan, selective_scan_reference
from .sites import SITES, Site, find_sites
from .tagger import MambaTagger
from .vision import VisionMamba


def use_reference_scan(model, on: bool = True):
    """Switch every SSM of a model between the sequential reference scan and the fast chunked one."""
    for module in model.modules():
        if isinstance(module, SelectiveSSM):
            module.reference_scan = on
    return model


__all__ = [
    "SITES",
    "LMConfig",
    "MambaBlock",
    "MambaConfig",
    "MambaLM",
    "MambaMixer",
    "MambaTagger",
    "RMSNorm",
    "SSMState",
    "SelectiveSSM",
    "Site",
    "TaggerConfig",
    "VisionConfig",
    "VisionMamba",
    "find_sites",
    "init_weights",
    "selective_scan",
    "selective_scan_reference",
    "use_reference_scan",
]
