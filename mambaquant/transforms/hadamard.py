"""Hadamard matrices of order n = m * 2^k from known constructions, and a fast transform for online use.

Constructions: Sylvester doubling; Paley I (order q + 1, q a prime power = 3 mod 4); Paley II (order 2(q + 1),
q a prime power = 1 mod 4), over GF(q) built here for prime powers. This covers m = 1, 12 (Paley I, q = 11),
20 (q = 19), 28 (q = 27), 36 (Paley II, q = 17), 40 (= 20 * 2), 52 (Paley II, q = 25), 60 (q = 59), 108 (q = 107),
140 (q = 139) and every other order reachable from a prime power. The orders 156 and 172 have no Paley
construction (and none of their halves does): `hadamard` raises for them, naming n.
"""

from functools import cache
from itertools import product

import torch

from ..errors import InputError


def _prime_power(q: int) -> tuple[int, int] | None:
    """q = p^k with p prime -> (p, k), else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mulmod(a: list[int], b: list[int], modulus: list[int], p: int) -> list[int]:
    """Product of two polynomials (coefficient lists, lowest degree first) modulo a monic polynomial over GF(p)."""
    k = len(modulus) - 1
    out = [0] * (2 * k - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] = (out[i + j] + x * y) % p
    for degree in range(len(out) - 1, k - 1, -1):
        coefficient = out[degree]
        if coefficient:
            for j in range(k + 1):
                out[degree - k + j] = (out[degree - k + j] - coefficient * modulus[j]) % p
    return out[:k]


def _irreducible(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree k over GF(p) (k <= 3 is all Mamba needs: no roots suffices)."""
    for coefficients in product(range(p), repeat=k):
        modulus = list(coefficients) + [1]
        if modulus[0] == 0:
            continue
        if k <= 3 and all(sum(c * pow(x, i, p) for i, c in enumerate(modulus)) % p for x in range(p)):
            return modulus
    raise InputError(f"no irreducible polynomial of degree {k} over GF({p}) found (degrees above 3 unsupported)")


@cache
def _quadratic_character(q: int) -> tuple[list[int], torch.Tensor]:
    """Elements of GF(q) as integers 0..q-1 (base-p digits = polynomial coefficients); returns the subtraction table
    index function's character chi(a - b) as a (q, q) tensor: 0 on the diagonal, +1 for squares, -1 otherwise."""
    p, k = _prime_power(q)
    digits = [[(e // p**i) % p for i in range(k)] for e in range(q)]

    def to_int(coefficients):
        return sum(c * p**i for i, c in enumerate(coefficients))

    if k == 1:
        squares = {(x * x) % p for x in range(1, p)}
    else:
        modulus = _irreducible(p, k)
        squares = {to_int(_poly_mulmod(digits[x], digits[x], modulus, p)) for x in range(1, q)}
    chi = torch.zeros(q, q)
    for a in range(q):
        for b in range(q):
            if a != b:
                difference = to_int([(x - y) % p for x, y in zip(digits[a], digits[b])])
                chi[a, b] = 1.0 if difference in squares else -1.0
    return digits, chi


def _paley_core(q: int, symmetric: bool) -> torch.Tensor:
    """[[0, 1^T], [+-1, Q]] with Q the Jacobsthal matrix of GF(q)."""
    _, chi = _quadratic_character(q)
    core = torch.zeros(q + 1, q + 1)
    core[0, 1:] = 1
    core[1:, 0] = 1 if symmetric else -1
    core[1:, 1:] = chi
    return core


@cache
def _base_order(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from Paley I or II, or None."""
    if m == 1:
        return torch.ones(1, 1)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    q = m - 1
    if _prime_power(q) and q % 4 == 3:
        return torch.eye(m) + _paley_core(q, symmetric=False)
    if m % 2 == 0:
        q = m // 2 - 1
        if _prime_power(q) and q % 4 == 1:
            core = _paley_core(q, symmetric=True)
            return torch.kron(core, torch.tensor([[1.0, -1.0], [-1.0, -1.0]])) + torch.kron(
                torch.eye(q + 1), torch.tensor([[1.0, 1.0], [1.0, -1.0]])
            )
    return None


def factor(n: int) -> tuple[int, int]:
    """n = m * 2^k with the largest power of two such that order m has a construction."""
    if n < 1:
        raise InputError(f"no Hadamard matrix of order {n}: expected a positive size")
    k, m = 0, n
    while m % 2 == 0 and m > 2:
        m, k = m // 2, k + 1
    while m <= n:  # a base order that is itself even (Paley II, 12 = 11 + 1, ...) is found by backing off
        if _base_order(m) is not None:
            return m, k
        if k == 0:
            break
        m, k = m * 2, k - 1
    raise InputError(
        f"no Hadamard construction for size {n} (= {m} x 2^{k}): supported sizes are m x 2^k where a Hadamard "
        "matrix of order m comes from Sylvester or Paley I/II (m = 1, 12, 20, 28, 36, 40, 52, 60, 108, 140, ...)"
    )


def hadamard(n: int, normalized: bool = True) -> torch.Tensor:
    """A Hadamard matrix H of order n (entries +-1, H H^T = n I); normalized: divided by sqrt(n), orthogonal."""
    m, k = factor(n)
    matrix = _base_order(m)
    for _ in range(k):
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / n**0.5 if normalized else matrix.clone()


def fast_hadamard(x: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """x @ H^T along the last dimension, H = hadamard(n) = H_2^{(x)k} (x) H_m. The Sylvester part is split into
    Kronecker factors of order at most 32, each applied as one small matrix product along its axis, then H_m:
    O(n (2^k_1 + 2^k_2 + ... + m)) multiply-adds in a few large products, faster on a CPU than log2(n) butterfly
    passes over memory."""
    n = x.shape[-1]
    m, k = factor(n)
    shape = x.shape
    parts = -(-k // 5)
    orders = [2 ** (k // parts + (i < k % parts)) for i in range(parts)]  # most significant first
    y = x.reshape(-1, n)
    right = n
    for order in orders:
        right //= order
        y = (hadamard(order, normalized=False).to(x.dtype) @ y.reshape(-1, order, right)).reshape(-1, n)
    if m > 1:
        y = (y.reshape(-1, m) @ _base_order(m).to(x.dtype).T).reshape(-1, n)
    y = y.reshape(shape)
    return y / n**0.5 if normalized else y


def hadamard_or_orthogonal(n: int, seed: int) -> torch.Tensor:
    """The normalised Hadamard of size n, or, where none exists (a dt_rank of 3, say), a seeded random orthogonal
    matrix: it mixes channels the same way but equalises their variances only on average."""
    try:
        return hadamard(n)
    except InputError:
        generator = torch.Generator().manual_seed(seed)
        return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0].float()
