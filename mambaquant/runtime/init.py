"""Random initialisation following Mamba's recipe (S4D-real A, log-uniform dt, small normal linears); for Mamba-2
mamba_ssm's (A uniform in [1, 16] per head)."""

import math

import torch
from torch import nn

from .block import RMSNorm
from .mixer import SelectiveSSM
from .mixer2 import GroupRMSNorm, Mamba2Mixer
from .moe import Experts, Router


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02, seed: int = 0, dt_min: float = 1e-3, dt_max: float = 0.1):
    """Deterministic for a given seed. Linear and embedding weights ~ N(0, std), and so a MoE's router and stacked
    experts: keep std small (0.02), a larger one makes random Mambas chaotic (tiny weight changes flip the outputs)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, Router)):
            module.weight.normal_(0.0, std, generator=generator)
        if isinstance(module, Experts):
            for weight in (module.gate_proj, module.up_proj, module.down_proj):
                if weight is not None:
                    weight.normal_(0.0, std, generator=generator)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
        if isinstance(module, (RMSNorm, GroupRMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
        if isinstance(module, nn.LayerNorm):
            module.bias.zero_()
    for name in ("cls_token", "pos_embed"):
        if hasattr(model, name):
            getattr(model, name).normal_(0.0, std, generator=generator)
    for ssm in (m for m in model.modules() if isinstance(m, SelectiveSSM)):
        E, N = ssm.A_log.shape
        if ssm.conv1d is not None:
            bound = 1 / math.sqrt(ssm.conv1d.kernel_size[0])
            ssm.conv1d.weight.uniform_(-bound, bound, generator=generator)
            if ssm.conv1d.bias is not None:
                ssm.conv1d.bias.zero_()
        ssm.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(E, N))
        ssm.D.fill_(1.0)
        ssm.dt_proj.weight.uniform_(-(ssm.dt_rank**-0.5), ssm.dt_rank**-0.5, generator=generator)
        dt = log_uniform(E, dt_min, dt_max, generator)
        ssm.dt_proj.bias.copy_(inverse_softplus(dt))
    for mixer in (m for m in model.modules() if isinstance(m, Mamba2Mixer)):
        heads = mixer.A_log.shape[0]
        bound = 1 / math.sqrt(mixer.conv1d.kernel_size[0])
        mixer.conv1d.weight.uniform_(-bound, bound, generator=generator)
        if mixer.conv1d.bias is not None:
            mixer.conv1d.bias.zero_()
        mixer.A_log.copy_(torch.log(torch.empty(heads).uniform_(1, 16, generator=generator)))
        mixer.D.fill_(1.0)
        mixer.dt_bias.copy_(inverse_softplus(log_uniform(heads, dt_min, dt_max, generator)))
    return model


def log_uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    log = torch.rand(count, generator=generator) * (math.log(high) - math.log(low)) + math.log(low)
    return log.exp().clamp(min=1e-4)


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))
