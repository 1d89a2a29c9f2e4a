"""MambaQuant: post-training quantization of Mamba state-space models."""

__version__ = "0.1.0"

from .errors import InputError
from .loaders import load, save
from .methods import METHODS, QuantConfig, quantize

__all__ = ["METHODS", "InputError", "QuantConfig", "__version__", "load", "quantize", "save"]
