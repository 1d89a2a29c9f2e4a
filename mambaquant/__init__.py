"""MambaQuant: post-training quantization of Mamba state-space models."""

from .allocator import tune_allocator

tune_allocator()  # before the first large tensor: see mambaquant/allocator.py

from .errors import InputError
from .loaders import load, load_state_dict, save
from .methods import METHODS, QuantConfig, quantize
from .runtime import build
from .version import __version__

__all__ = ["METHODS", "InputError", "QuantConfig", "__version__", "build", "load", "load_state_dict", "quantize",
           "save"]
