"""Every method at W8A8, W4A8 and W4A16 on random-initialised models of the mamba-130m and Vim-T configurations:
it runs, stays finite, and stays close to the full-precision model."""

import pytest
import torch

import mambaquant
from mambaquant.runtime import LMConfig, MambaLM, VisionConfig, VisionMamba, init_weights

from .helpers import MAMBA1_METHODS, rel_err


@pytest.fixture(scope="module")
def real_configs():
    torch.manual_seed(0)
    lm = init_weights(MambaLM(LMConfig(d_model=768, n_layer=24, vocab_size=50280)), seed=0).eval()
    vim = init_weights(VisionMamba(VisionConfig(d_model=192, n_layer=24)), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    lm_calib, lm_x = torch.randint(0, 50280, (2, 32), generator=g), torch.randint(0, 50280, (1, 32), generator=g)
    vim_calib, vim_x = torch.randn(2, 3, 224, 224, generator=g), torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        return [(lm, lm_calib, lm_x, lm(lm_x)), (vim, vim_calib, vim_x, vim(vim_x))]


@pytest.mark.parametrize("method", MAMBA1_METHODS[1:])
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, 16)])
def test_method_on_130m_and_vim_t(real_configs, method, w_bits, a_bits):
    for model, calib, x, reference in real_configs:
        quantized = mambaquant.quantize(model, method=method, w_bits=w_bits, a_bits=a_bits, calib=calib)
        with torch.no_grad():
            out = quantized(x)
        assert torch.isfinite(out).all()
        # random weights at 4 bits lose most of the (weak) logit signal of a random 24-layer model: a smoke bound
        assert rel_err(out, reference) < (0.35 if w_bits == 8 else 1.2), (type(model).__name__, method)
        branches = 2 if isinstance(model, VisionMamba) else 1
        per_block = 3 + 4 * branches  # norm, x, out_proj_in; x_proj_in, dt_low, h, C per branch
        assert len(quantized.quantization_report.activation_sites) == (0 if a_bits == 16 else per_block * 24 + 1)
