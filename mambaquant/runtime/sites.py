"""Named sites: the places in the forward pass where an observer, an online transform or a quantizer may act.

Every site is a `Site` module called explicitly in a `forward`; it is the identity until something is attached.
A site's full name is its module path without the `sites.` container, e.g. `layers.3.mixer.ssm.h`.
Tensors at a site are laid out (batch, time, channels...) so per-token and per-channel statistics read the same
everywhere; the scan sites (`dA`, `dBu`, `h`) see the sequence in chunks of consecutive time steps.
"""

from collections.abc import Callable

import torch
from torch import nn

# Short site name -> what flows through it. Shapes: B batch, L time, D d_model, E d_inner, N d_state, R dt_rank.
SITES = {
    # model
    "embed": "embedding output, the residual stream entering the first block (B, L, D)",
    "norm_f": "final norm output = head input (B, L, D)",
    "hidden": "an MLP head's hidden activation = its second linear's input (B, hidden) or (B, L, hidden)",
    "logits": "head output (B, L, vocab) or (B, classes)",
    # block
    "residual": "residual stream entering the block (B, L, D)",
    "norm": "block norm output = in_proj input (B, L, D)",
    "out": "mixer output added to the residual (B, L, D)",
    # mixer
    "x": "in_proj x half = conv1d input (B, L, E)",
    "z": "in_proj z half = gate input (B, L, E)",
    "gate": "SiLU(z) (B, L, E)",
    "out_proj_in": "y * gate = out_proj input (B, L, E)",
    # selective SSM branch (ssm, and ssm_b for the reversed sequence of a bidirectional block)
    "conv": "depthwise conv1d + SiLU output = scan input u, also feeding x_proj (B, L, E)",
    "x_proj_in": "u as x_proj's input only, where x_proj-side rotations act (B, L, E)",
    "dt_low": "x_proj dt part = dt_proj input (B, L, R)",
    "B": "x_proj B part, the scan's input matrix (B, L, N)",
    "C": "x_proj C part, the h*C operand (B, L, N)",
    "dt": "softplus(dt_proj + bias), the step size delta (B, L, E)",
    "dA": "discretised A = exp(delta * A) (B, T, E, N) per chunk",
    "dBu": "discretised input delta * B * u (B, T, E, N) per chunk",
    "h": "state h as it enters the h*C product (B, T, E, N) per chunk; the recurrence itself stays exact",
    "hC": "scan output h*C before the D skip (B, L, E)",
    "y": "scan output h*C + D*u (B, L, E)",
}

# The Mamba-2 mixer's sites (the block and model sites above are shared). Shapes: S d_ssm = H heads x P head_dim,
# G n_groups, N d_state, K = S + 2 G N the conv channels; groups and heads are laid out group-major, head-major.
MAMBA2_SITES = {
    "z": "in_proj z part = gate input (B, L, S)",
    "xBC": "in_proj x, B, C part = conv1d input (B, L, K)",
    "x": "conv1d + SiLU x part = scan input (B, L, S), heads of P consecutive channels",
    "B": "conv1d + SiLU B part, the scan's input matrix (B, L, G*N)",
    "C": "conv1d + SiLU C part, the C.h operand (B, L, G*N)",
    "dt": "clamp(softplus(in_proj dt part + dt_bias)), the step size per head (B, L, H)",
    "h": "state h as it enters the C.h product (B, T, H, P, N) per chunk; the recurrence itself stays exact",
    "y": "scan output C.h + D*x (B, L, S)",
    "gate": "SiLU(z) (B, L, S)",
    "out_proj_in": "norm(y * gate) per group (with the MLP part SiLU(z0)*x0 before it, if any) = out_proj input "
                   "(B, L, E)",
}

# The layers beside Mamba in hybrid models (mambaquant.runtime.attention, .mlp, .moe). Their input is the block norm
# output, the block's `norm` site, except where a consumer must see it on its own (the MLP, the MoE's router and
# experts). Shapes: H query heads, G key/value heads, P head_dim, F the MLP or expert width, T_e the tokens routed
# to one expert, R a latent MoE's latent width.
ATTENTION_SITES = {
    "q": "queries after RoPE (B, L, H*P), heads of P consecutive channels",
    "k": "the new keys after RoPE, as the KV cache holds them (B, L, G*P)",
    "v": "the new values, as the KV cache holds them (B, L, G*P)",
    "o_proj_in": "softmax(q k^T * scale + causal mask) v per head = o_proj input (B, L, H*P)",
}
MLP_SITES = {
    "mlp_in": "MLP input = gate_proj and up_proj input (B, L, D)",
    "down_in": "act(gate) * up (gated) or act(up) = down_proj input (B, L, F)",
}
MOE_SITES = {
    "router_in": "MoE input as the router's input only (B, L, D); the router is meant to stay in float",
    "fc1_latent_in": "latent MoE: MoE input as fc1_latent_proj's input only (B, L, D)",
    "expert_in": "the routed experts' gate and up input before tokens are gathered per expert: the MoE input "
                 "(B, L, D), or fc1_latent_proj's output (B, L, R) in a latent MoE",
    "expert_down_in": "act(gate) * up or act(up) of one expert = its down_proj input (1, T_e, F); one site for all "
                      "experts, called once per expert that received tokens, in expert order",
    "fc2_latent_in": "latent MoE: the experts' weighted sum = fc2_latent_proj input (B, L, R)",
}
# Zamba2's hybrid layer (mambaquant.runtime.zamba), beside its block sites (`residual`, `norm` the Mamba-2 input,
# `out`) and those of its attention and MLP.
ZAMBA_SITES = {
    "joined": "the shared block's input cat([hidden state, embedding output]) (B, L, 2D)",
    "attention_in": "the shared block's norm of it = q, k, v input (B, L, 2D)",
    "linear_in": "the shared block's output = the layer's `linear` input (B, L, D)",
}
TABLES = {"mamba1": SITES, "mamba2": MAMBA2_SITES, "attention": ATTENTION_SITES, "mlp": MLP_SITES,
          "moe": MOE_SITES, "zamba": ZAMBA_SITES}

Observer = Callable[["Site", torch.Tensor], None]


class Site(nn.Module):
    """Identity with two attachment points: an op (replaces the tensor: an online transform, a fake quantizer) and
    observers (read the tensor leaving the site, after the op: what the consumer sees)."""

    def __init__(self, kind: str, table: str = "mamba1"):
        super().__init__()
        if kind not in TABLES[table] and kind not in SITES:
            raise KeyError(f"unknown {table} site kind {kind!r}")
        self.kind, self.table = kind, table
        self.name = kind  # set to the full path by `name_sites`
        self.observers: list[Observer] = []
        self.op: nn.Module | None = None

    @property
    def active(self) -> bool:
        return bool(self.observers) or self.op is not None

    @property
    def per_token(self) -> bool:
        """Whether the site treats each token (time step) on its own, so that handing it a tensor a few steps at a
        time gives the same result as all at once: no observers (their statistics may pool what they are given) and
        every op declaring `per_token`."""
        if self.observers:
            return False
        ops = [] if self.op is None else list(self.op) if isinstance(self.op, nn.Sequential) else [self.op]
        return all(getattr(op, "per_token", False) for op in ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op is not None:
            x = self.op(x)
        for observe in self.observers:
            observe(self, x)
        return x

    def extra_repr(self) -> str:
        return self.name


def make_sites(*kinds: str, table: str = "mamba1") -> nn.ModuleDict:
    return nn.ModuleDict({kind: Site(kind, table) for kind in kinds})


def name_sites(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if isinstance(module, Site):
            module.name = path.replace("sites.", "")


def find_sites(model: nn.Module) -> dict[str, Site]:
    """All sites of a model by full name, in forward order: a module's `forward_order` (its children and its own
    sites, as `sites.KIND`, in the order its forward reaches them) where it has one, registration order after."""
    found = {}

    def visit(module: nn.Module) -> None:
        if isinstance(module, Site):
            found[module.name] = module
            return
        children = {name: child for name, child in module.named_children() if name != "sites"}
        children.update({f"sites.{kind}": site for kind, site in getattr(module, "sites", {}).items()})
        order = [name for name in getattr(module, "forward_order", ()) if name in children]
        for name in order + [name for name in children if name not in order]:
            visit(children[name])

    visit(model)
    return found
