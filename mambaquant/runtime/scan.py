"""The selective scan h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, returning h_t C_t for every step.

Two implementations with the same contract:
- `selective_scan_reference`: one step at a time, written as the recurrence reads;
- `selective_scan`: the fast CPU path. It discretises a chunk of steps at once, then runs the recurrence in place
  over the chunk with one fused multiply-add per step, so nothing of size (L, E, N) is ever held.

Both apply the optional site hooks `dA`, `dBu` and `h` (callables on (B, T, E, N) tensors; None skips them) and
return (hC, last_state). `h` only changes the operand of the h*C product: the recurrence always carries the exact state.
"""

from collections.abc import Callable

import torch

Hook = Callable[[torch.Tensor], torch.Tensor] | None


def _initial_state(u: torch.Tensor, A: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    if state is not None:
        return state
    return u.new_zeros(u.shape[0], A.shape[0], A.shape[1])


def _apply(hook: Hook, x: torch.Tensor) -> torch.Tensor:
    return x if hook is None else hook(x)


def selective_scan_reference(
    u: torch.Tensor,  # (B, L, E) scan input
    dt: torch.Tensor,  # (B, L, E) step sizes, already softplus-ed
    A: torch.Tensor,  # (E, N) negative real
    B: torch.Tensor,  # (B, L, N)
    C: torch.Tensor,  # (B, L, N)
    state: torch.Tensor | None = None,  # (B, E, N)
    dA_hook: Hook = None,
    dBu_hook: Hook = None,
    h_hook: Hook = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    h = _initial_state(u, A, state)
    outputs = []
    for t in range(u.shape[1]):
        dA = _apply(dA_hook, torch.exp(dt[:, t, :, None] * A)[:, None])[:, 0]
        dBu = _apply(dBu_hook, (dt[:, t] * u[:, t])[:, None, :, None] * B[:, t, None, None, :])[:, 0]
        h = dA * h + dBu
        h_used = _apply(h_hook, h[:, None])[:, 0]
        outputs.append(torch.einsum("ben,bn->be", h_used, C[:, t]))
    return torch.stack(outputs, dim=1), h


def selective_scan(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor | None = None,
    dA_hook: Hook = None,
    dBu_hook: Hook = None,
    h_hook: Hook = None,
    chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    h = _initial_state(u, A, state)
    length = u.shape[1]
    hC = u.new_empty(u.shape)
    dtu = dt * u
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        dA = _apply(dA_hook, torch.exp(dt[:, start:stop, :, None] * A))
        hs = _apply(dBu_hook, dtu[:, start:stop, :, None] * B[:, start:stop, None, :])
        if dBu_hook is not None:  # the hook may return a view of its input; the loop below writes in place
            hs = hs.clone()
        hs[:, 0].addcmul_(h, dA[:, 0])
        for t in range(1, stop - start):
            hs[:, t].addcmul_(hs[:, t - 1], dA[:, t])
        h = hs[:, -1].clone()
        h_used = _apply(h_hook, hs)
        hC[:, start:stop] = torch.einsum("bten,btn->bte", h_used, C[:, start:stop])
    return hC, h


class _TrainableScan(torch.autograd.Function):
    """The chunked scan with a hand-written backward: the forward keeps only the state at each chunk start; the
    backward recomputes a chunk's states and runs the adjoint recurrence g_t = C_t dy_t + dA_{t+1} g_{t+1}
    backwards in time, one fused multiply-add per step, like the forward."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, chunk):
        h = _initial_state(u, A, None)
        starts = []
        hC = u.new_empty(u.shape)
        dtu = dt * u
        for start in range(0, u.shape[1], chunk):
            stop = min(start + chunk, u.shape[1])
            starts.append(h)
            dA = torch.exp(dt[:, start:stop, :, None] * A)
            hs = dtu[:, start:stop, :, None] * B[:, start:stop, None, :]
            hs[:, 0].addcmul_(h, dA[:, 0])
            for t in range(1, stop - start):
                hs[:, t].addcmul_(hs[:, t - 1], dA[:, t])
            h = hs[:, -1].clone()
            hC[:, start:stop] = torch.einsum("bten,btn->bte", hs, C[:, start:stop])
        ctx.save_for_backward(u, dt, A, B, C, torch.stack(starts, 1))
        ctx.chunk = chunk
        return hC

    @staticmethod
    def backward(ctx, grad_hC):
        u, dt, A, B, C, starts = ctx.saved_tensors
        chunk, length = ctx.chunk, u.shape[1]
        grad_u, grad_dt, grad_B, grad_C = (torch.empty_like(x) for x in (u, dt, B, C))
        grad_A = torch.zeros_like(A)
        carry = None  # dA_{t+1} * g_{t+1} from the chunk after this one
        for index in reversed(range(starts.shape[1])):
            start = index * chunk
            stop = min(start + chunk, length)
            dA = torch.exp(dt[:, start:stop, :, None] * A)
            dtu = dt[:, start:stop] * u[:, start:stop]
            hs = dtu[..., None] * B[:, start:stop, None, :]
            hs[:, 0].addcmul_(starts[:, index], dA[:, 0])
            for t in range(1, stop - start):
                hs[:, t].addcmul_(hs[:, t - 1], dA[:, t])
            gs = grad_hC[:, start:stop, :, None] * C[:, start:stop, None, :]  # dL/dh_t, filled in backwards
            if carry is not None:
                gs[:, -1] += carry
            for t in range(stop - start - 2, -1, -1):
                gs[:, t].addcmul_(gs[:, t + 1], dA[:, t + 1])
            carry = gs[:, 0] * dA[:, 0]
            h_prev = torch.cat([starts[:, index, None], hs[:, :-1]], dim=1)
            q = gs * h_prev * dA  # dL/d(dt*A) elementwise
            grad_C[:, start:stop] = torch.einsum("bten,bte->btn", hs, grad_hC[:, start:stop])
            w = torch.einsum("bten,btn->bte", gs, B[:, start:stop])
            grad_u[:, start:stop] = w * dt[:, start:stop]
            grad_dt[:, start:stop] = w * u[:, start:stop] + torch.einsum("bten,en->bte", q, A)
            grad_B[:, start:stop] = torch.einsum("bten,bte->btn", gs, dtu)
            grad_A += torch.einsum("bten,bte->en", q, dt[:, start:stop])
        return grad_u, grad_dt, grad_A, grad_B, grad_C, None


def selective_scan_trainable(u, dt, A, B, C, chunk: int = 16) -> torch.Tensor:
    """Differentiable h*C for training (zero initial state, no site hooks)."""
    return _TrainableScan.apply(u, dt, A, B, C, chunk)
