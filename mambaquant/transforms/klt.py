"""KLT-enhanced rotation: R = K H, K the eigenvectors of the activation covariance at a site. X K decorrelates
the channels (variances = the eigenvalues); the Hadamard then spreads every eigenvalue over all channels, so each
channel of X K H has the same variance, the mean eigenvalue. A plain Hadamard leaves the variance of channel l at
sum_j (sum_i H_il K_ij)^2 lambda_j / (n - 1), which depends on l."""

import torch

from ..errors import InputError
from .hadamard import hadamard_or_orthogonal


class CovarianceObserver:
    """A site observer accumulating the mean and covariance over the last (channel) dimension, in float64."""

    def __init__(self):
        self.total = None
        self.outer = None
        self.count = 0

    @torch.no_grad()
    def __call__(self, site, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        if self.total is None:
            self.total = torch.zeros(flat.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
        self.total += flat.sum(0)
        self.outer += flat.T @ flat
        self.count += flat.shape[0]

    @classmethod
    def pooled(cls, observers: list["CovarianceObserver"]) -> "CovarianceObserver":
        """One observer holding what all of `observers` saw, as if it had watched their sites itself."""
        pooled = cls()
        pooled.total = sum(o.total for o in observers)
        pooled.outer = sum(o.outer for o in observers)
        pooled.count = sum(o.count for o in observers)
        return pooled

    def covariance(self) -> torch.Tensor:
        mean = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        if not torch.isfinite(covariance).all():
            raise InputError("calibration produced NaN or Inf activations; expected finite activations: check the "
                             "model's weights and the calibration data")
        return covariance


class AbsMaxObserver:
    """A site observer keeping the largest |x| per channel (last dimension)."""

    def __init__(self):
        self.absmax = None

    @torch.no_grad()
    def __call__(self, site, x: torch.Tensor) -> None:
        value = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        self.absmax = value if self.absmax is None else torch.maximum(self.absmax, value)


def klt(covariance: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a covariance as columns, by decreasing eigenvalue, each with a deterministic sign."""
    eigenvalues, vectors = torch.linalg.eigh(covariance.double())
    vectors = vectors[:, eigenvalues.argsort(descending=True)]
    signs = torch.sign(vectors[vectors.abs().argmax(0), torch.arange(vectors.shape[1])])
    return (vectors * signs).float()


def klt_hadamard(covariance: torch.Tensor) -> torch.Tensor:
    """The KLT-enhanced rotation R = K H (orthogonal, n x n); where no Hadamard of size n exists, a seeded random
    orthogonal matrix stands in for H (it equalises the variances only on average)."""
    return klt(covariance) @ hadamard_or_orthogonal(covariance.shape[0], seed=0)
