import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambaquant.errors import InputError
from mambaquant.transforms.hadamard import factor, fast_hadamard, hadamard

BASES = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140)
SUPPORTED = sorted({m * 2**k for m in BASES for k in range(14) if m * 2**k <= 8192})


def gram(H: torch.Tensor) -> torch.Tensor:
    """H H^T exactly: int8 x int8 -> int32 where torch._int_mm takes the shape, else float32 (sums below 2^24)."""
    n = H.shape[0]
    if n >= 32 and n % 8 == 0:
        H8 = H.to(torch.int8)
        return torch._int_mm(H8, H8.T.contiguous())
    return (H @ H.T).round().int()


def test_every_supported_size_up_to_8192_is_hadamard():
    for n in SUPPORTED:
        H = hadamard(n, normalized=False)
        assert set(H.unique().tolist()) <= {-1.0, 1.0}, n
        assert torch.equal(gram(H), n * torch.eye(n, dtype=torch.int32)), n


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
