import pytest
import torch

from mambaquant.runtime.scan import selective_scan, selective_scan_reference, selective_scan_trainable

from .helpers import rel_err


def scan_inputs(batch, length, E, N, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, E, generator=g)
    dt = torch.rand(batch, length, E, generator=g) * 0.2 + 1e-3
    A = -torch.rand(E, N, generator=g) * 4 - 0.1
    B = torch.randn(batch, length, N, generator=g)
    C = torch.randn(batch, length, N, generator=g)
    return u, dt, A, B, C


def materialised_scan(u, dt, A, B, C):
    """Textbook form: discretise every step up front (L x E x N), then recur."""
    dA = torch.exp(dt[..., None] * A)  # (B, L, E, N)
    dBu = dt[..., None] * B[:, :, None, :] * u[..., None]
    h = torch.zeros_like(dA[:, 0])
    out = []
    for t in range(u.shape[1]):
        h = dA[:, t] * h + dBu[:, t]
        out.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(out, 1), h


@pytest.mark.parametrize("batch,length,E,N,chunk", [(1, 1, 8, 4, 16), (2, 37, 24, 16, 16), (3, 64, 16, 8, 5)])
def test_fast_scan_equals_reference(batch, length, E, N, chunk):
    inputs = scan_inputs(batch, length, E, N, seed=length)
    y_ref, h_ref = selective_scan_reference(*inputs)
    y, h = selective_scan(*inputs, chunk=chunk)
    y_mat, h_mat = materialised_scan(*inputs)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5
    assert rel_err(y_ref, y_mat) < 1e-5 and rel_err(h_ref, h_mat) < 1e-5


def test_scan_continues_from_state():
    u, dt, A, B, C = scan_inputs(2, 50, 12, 6, seed=3)
    y_full, h_full = selective_scan(u, dt, A, B, C)
    y1, h1 = selective_scan(u[:, :21], dt[:, :21], A, B[:, :21], C[:, :21])
    y2, h2 = selective_scan(u[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], state=h1)
    assert rel_err(torch.cat([y1, y2], 1), y_full) < 1e-6
    assert rel_err(h2, h_full) < 1e-6


def test_hooks_apply_identically_in_both_scans():
    """A per-token rounding of h (the h*C operand) and a scaling of dA/dBu give the same result in both scans, and
    the h hook changes only the output, never the carried state."""
    inputs = scan_inputs(2, 40, 16, 8, seed=5)

    def round_h(h):  # per (batch, time) step, like a per-token quantizer
        scale = h.abs().amax(dim=(-2, -1), keepdim=True) / 127
        return torch.round(h / scale) * scale

    hooks = dict(dA_hook=lambda a: a * 0.99, dBu_hook=lambda b: b * 1.5, h_hook=round_h)
    y_ref, h_ref = selective_scan_reference(*inputs, **hooks)
    y, h = selective_scan(*inputs, chunk=7, **hooks)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5
    _, h_exact_state = selective_scan(*inputs, dA_hook=hooks["dA_hook"], dBu_hook=hooks["dBu_hook"])
    assert torch.allclose(h, h_exact_state)
    y_plain, _ = selective_scan(*inputs)
    assert rel_err(y, y_plain) > 1e-3  # the hooks did act


def test_trainable_scan_gradients():
    """The hand-written backward against finite differences and against autograd through the reference scan."""
    inputs = [x.double().requires_grad_() for x in scan_inputs(2, 23, 5, 3, seed=9)]
    assert torch.autograd.gradcheck(selective_scan_trainable, inputs)
    y = selective_scan_trainable(*inputs)
    grad_out = torch.randn_like(y)
    ours = torch.autograd.grad(y, inputs, grad_out)
    y_ref, _ = selective_scan_reference(*inputs)
    reference = torch.autograd.grad(y_ref, inputs, grad_out)
    assert rel_err(y, y_ref) < 1e-12
    for a, b in zip(ours, reference):
        assert rel_err(a, b) < 1e-10
