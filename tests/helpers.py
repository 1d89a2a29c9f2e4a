import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm of the difference over the norm of the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
