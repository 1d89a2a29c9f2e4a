"""Our own Mamba-1, Mamba-2 and hybrid runtime: explicit modules, every quantizable tensor at a named site."""

from .build import build
from .block import CenteredRMSNorm, MambaBlock, NoNorm, RMSNorm
from .config import (LMConfig, Mamba2Config, Mamba2LMConfig, MambaConfig, ModelConfig, TaggerConfig,
                     VisionConfig)
from .conv import SSMState
from .hybrid_config import AttentionConfig, HybridLMConfig, MLPConfig, MoEConfig
from .init import init_weights
from .lm import MambaLM
from .mixer import MambaMixer, SelectiveSSM
from .mixer2 import GroupRMSNorm, Mamba2Mixer
from .model import MambaModel, MambaTagger, VisionMamba
from .scan import selective_scan, selective_scan_reference
from .sites import MAMBA2_SITES, SITES, Site, find_sites
from .ssd import ssd_scan, ssd_scan_reference


def use_reference_scan(model, on: bool = True):
    """Switch every SSM of a model between the sequential reference scan and the fast chunked one."""
    for module in model.modules():
        if isinstance(module, (SelectiveSSM, Mamba2Mixer)):
            module.reference_scan = on
    return model


__all__ = [
    "MAMBA2_SITES",
    "SITES",
    "AttentionConfig",
    "GroupRMSNorm",
    "HybridLMConfig",
    "MLPConfig",
    "MoEConfig",
    "LMConfig",
    "Mamba2Config",
    "Mamba2LMConfig",
    "Mamba2Mixer",
    "MambaBlock",
    "MambaConfig",
    "ModelConfig",
    "MambaLM",
    "MambaMixer",
    "MambaModel",
    "MambaTagger",
    "CenteredRMSNorm",
    "NoNorm",
    "RMSNorm",
    "SSMState",
    "SelectiveSSM",
    "Site",
    "TaggerConfig",
    "VisionConfig",
    "VisionMamba",
    "build",
    "find_sites",
    "init_weights",
    "selective_scan",
    "selective_scan_reference",
    "ssd_scan",
    "ssd_scan_reference",
    "use_reference_scan",
]
