"""MambaQuant: post-training quantization of Mamba state-space models."""

__version__ = "0.1.0"

from .errors import InputError  # noqa: E402
from .loaders import load, save  # noqa: E402
from .methods import METHODS, QuantConfig, quantize  # noqa: E402

__all__ = ["InputError", "METHODS", "QuantConfig", "__version__", "load", "quantize", "save"]
