import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambaquant.errors import InputError
from mambaquant.transforms.hadamard import factor, fast_hadamard, hadamard

BASES = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140)
SUPPORTED = sorted({m * 2**k for m in BASES for k in range(14) if m * 2**k <= 8192})


def gram_rows(H: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """H[rows] H^T, exactly: float32 sums of +-1 products stay integers below 2^24. (Not torch._int_mm: it has no
    fast kernel on some CPUs, where an 8192-wide product takes many minutes.)"""
    return (H[rows] @ H.T).round().int()


def test_every_supported_size_up_to_8192_is_hadamard():
    """Every row against every row up to 1024; above, 64 rows drawn at random (seeded) against every row."""
    generator = torch.Generator().manual_seed(0)
    for n in SUPPORTED:
        H = hadamard(n, normalized=False)
        assert bool((H.abs() == 1).all()), n
        rows = torch.arange(n) if n <= 1024 else torch.randperm(n, generator=generator)[:64]
        expected = n * torch.eye(n, dtype=torch.int32)[rows]
        assert torch.equal(gram_rows(H, rows), expected), n


@pytest.mark.parametrize("n", [156, 172, 92, 6, 7, 0])
def test_unsupported_sizes_name_n(n):
    with pytest.raises(InputError, match=rf"\b{n}\b"):
        hadamard(n)


@settings(max_examples=40, deadline=None)
@given(base=st.sampled_from(BASES), k=st.integers(0, 6), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_fast_transform_equals_dense(base, k, rows, seed):
    n = base * 2**k
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dense = x @ hadamard(n).double().T
    assert torch.allclose(fast_hadamard(x), dense, atol=1e-10)
    assert factor(n)[0] * 2 ** factor(n)[1] == n
