import subprocess
import sys

import torch

from mambaquant.methods import MAMBA2_ONLY_METHODS, METHODS

MAMBA1_METHODS = tuple(m for m in METHODS if m not in MAMBA2_ONLY_METHODS)  # every method of a Mamba-1 model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm of the difference over the norm of the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_cli(*args) -> tuple[int, str, str]:
    """`python -m mambaquant ARGS` in a fresh process: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "mambaquant", *map(str, args)], capture_output=True, text=True,
                          check=False)
    return proc.returncode, proc.stdout, proc.stderr
