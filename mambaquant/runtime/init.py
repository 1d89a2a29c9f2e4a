"""Random initialisation following Mamba's recipe (S4D-real A, log-uniform dt, small normal linears)."""

import math

import torch
from torch import nn

from .block import RMSNorm
from .mixer import SelectiveSSM


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02, seed: int = 0, dt_min: float = 1e-3, dt_max: float = 0.1):
    """Deterministic for a given seed. Linear and embedding weights ~ N(0, std): keep std small (0.02), a larger
    one makes random Mambas chaotic (tiny weight changes flip the outputs)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std, generator=generator)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
        if isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
        if isinstance(module, nn.LayerNorm):
            module.bias.zero_()
    for name in ("cls_token", "pos_embed"):
        if hasattr(model, name):
            getattr(model, name).normal_(0.0, std, generator=generator)
    for ssm in (m for m in model.modules() if isinstance(m, SelectiveSSM)):
        E, N = ssm.A_log.shape
        bound = 1 / math.sqrt(ssm.conv1d.kernel_size[0])
        ssm.conv1d.weight.uniform_(-bound, bound, generator=generator)
        if ssm.conv1d.bias is not None:
            ssm.conv1d.bias.zero_()
        ssm.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(E, N))
        ssm.D.fill_(1.0)
        ssm.dt_proj.weight.uniform_(-(ssm.dt_rank**-0.5), ssm.dt_rank**-0.5, generator=generator)
        log_dt = torch.rand(E, generator=generator) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = log_dt.exp().clamp(min=1e-4)
        ssm.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    return model
