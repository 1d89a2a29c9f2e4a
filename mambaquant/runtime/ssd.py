"""The Mamba-2 (SSD) scan: per head, h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, returning C_t h_t for every step.

Shapes: x (b, L, H, P) scan input, dt (b, L, H) step sizes (softplus-ed and clamped), A (H,) negative, B and C
(b, L, G, N) with each of the G groups shared by H / G consecutive heads, state h (b, H, P, N).

Two implementations with the same contract, both returning (hC (b, L, H, P), last state):
- `ssd_scan_reference`: one step at a time, written as the recurrence reads;
- `ssd_scan`: the fast CPU path. Chunks of consecutive steps are computed in the SSD "dual" form: inside a chunk,
  an attention-like (chunk x chunk) matrix (C_t . B_s) exp(sum of dt A from s to t) dt_s applied to x; from the
  state entering the chunk, C_t h exp(sum of dt A up to t); the state leaving it, one matrix product. Only one
  state (b, H, P, N) is held: nothing of size (L, H, P, N) exists. Differentiable (training uses it as it is).

The optional `h_hook` (a callable on the states (b, T, H, P, N) of a chunk, the `h` site) changes only the operand
of the C.h product, as in Mamba-1; with it the fast path runs the chunk step by step to have those states. A hook
that treats each step on its own (`per_token`, e.g. a calibrated quantizer) is handed a few steps at a time instead,
at most HOOK_BYTES of states: a chunk's states are 50 MiB at batch 1 on the 130m configuration, and each op of the
hook on them went to fresh pages from the kernel (issue 17: 80 % of a W8A8 prefill); the result is the same.
"""

from collections.abc import Callable

import torch

Hook = Callable[[torch.Tensor], torch.Tensor] | None
CHUNK = 64  # steps per chunk: the (chunk x chunk) matrices stay small beside a state; the result does not depend on it
HOOK_BYTES = 2 << 20  # states per call of a per-token hook: cache-sized, far below glibc's 32 MiB mmap threshold


def _by_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., G, N) group tensor -> (..., H, N), each group repeated for its consecutive heads."""
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def _initial_state(x: torch.Tensor, B: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    if state is not None:
        return state
    return x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3])


def _stepwise(x, dt, A, B, C, h, h_hook: Hook):
    """The recurrence over a few steps with every state kept: (hC (b, T, H, P), last state)."""
    H = x.shape[2]
    decay = torch.exp(dt * A)  # (b, T, H)
    hs = (dt[..., None] * x)[..., None] * _by_head(B, H)[:, :, :, None, :]  # (b, T, H, P, N)
    states = []
    for step, step_decay in zip(hs.unbind(1), decay.unbind(1)):  # out of place: autograd may be recording
        h = step + h * step_decay[..., None, None]
        states.append(h)
    hs = torch.stack(states, dim=1)
    h_used = hs if h_hook is None else h_hook(hs)
    return torch.einsum("bthpn,bthn->bthp", h_used, _by_head(C, H)), h


def ssd_scan_reference(x, dt, A, B, C, state=None, h_hook: Hook = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = _initial_state(x, B, state)
    H = x.shape[2]
    outputs = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # (b, H, 1, 1)
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * _by_head(B[:, t], H)[:, :, None, :]
        h_used = h if h_hook is None else h_hook(h[:, None])[:, 0]
        outputs.append(torch.einsum("bhpn,bhn->bhp", h_used, _by_head(C[:, t], H)))
    return torch.stack(outputs, dim=1), h


def ssd_scan(x, dt, A, B, C, state=None, h_hook: Hook = None, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    b, length, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    per_group = H // G
    h = _initial_state(x, B, state)
    if length == 1 or h_hook is not None:
        if getattr(h_hook, "per_token", False):
            chunk = max(1, HOOK_BYTES // (h.numel() * h.element_size()))
        outputs = []
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            hC, h = _stepwise(x[:, start:stop], dt[:, start:stop], A, B[:, start:stop], C[:, start:stop], h, h_hook)
            outputs.append(hC)
        return torch.cat(outputs, dim=1), h
    log_decay = dt * A  # (b, L, H), <= 0
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    outputs = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        T = stop - start
        cum = log_decay[:, start:stop].cumsum(1).transpose(1, 2)  # (b, H, T): sum of dt A up to t
        xs = x[:, start:stop].transpose(1, 2)  # (b, H, T, P)
        Bs = B[:, start:stop].transpose(1, 2)  # (b, G, T, N)
        Cs = C[:, start:stop].transpose(1, 2)
        dts = dt[:, start:stop].transpose(1, 2)  # (b, H, T)
        # inside the chunk: y_t = sum_{s<=t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s
        scores = (Cs @ Bs.transpose(-1, -2))[:, :, None]  # (b, G, 1, T, T)
        gaps = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal[:T, :T], float("-inf"))
        mix = (scores * gaps.exp().view(b, G, per_group, T, T)).view(b, H, T, T) * dts[:, :, None, :]
        y = mix @ xs  # (b, H, T, P)
        # from the state entering the chunk: C_t h exp(cum_t)
        carried = (Cs @ h.view(b, G, per_group * P, N).transpose(-1, -2)).view(b, G, T, per_group, P)
        y = y + carried.transpose(2, 3).reshape(b, H, T, P) * cum.exp()[..., None]
        # the state leaving it: h exp(cum_T) + sum_s exp(cum_T - cum_s) dt_s x_s B_s^T
        weights = (cum[..., -1:] - cum).exp() * dts  # (b, H, T)
        xw = (xs * weights[..., None]).view(b, G, per_group, T, P).transpose(-1, -2).reshape(b, G, per_group * P, T)
        h = h * cum[..., -1].exp()[..., None, None] + (xw @ Bs).view(b, H, P, N)
        outputs.append(y.transpose(1, 2))
    return torch.cat(outputs, dim=1), h
