import subprocess
import sys

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm of the difference over the norm of the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_cli(*args) -> tuple[int, str, str]:
    """`python -m mambaquant ARGS` in a fresh process: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "mambaquant", *map(str, args)], capture_output=True, text=True,
                          check=False)
    return proc.returncode, proc.stdout, proc.stderr
