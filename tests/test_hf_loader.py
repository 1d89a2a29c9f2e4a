"""Our runtime against transformers' own MambaForCausalLM on random models of the real configurations."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import MambaConfig, MambaForCausalLM

import mambaquant
from mambaquant.runtime import MambaLM

from .helpers import rel_err

REAL_CONFIGS = {  # state-spaces/mamba-130m-hf and mamba-370m-hf
    "130m": dict(hidden_size=768, num_hidden_layers=24),
    "370m": dict(hidden_size=1024, num_hidden_layers=48),
}


def random_hf(size: str, seed: int = 0, **overrides) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=50280, initializer_range=0.02, **{**REAL_CONFIGS[size], **overrides})
    return MambaForCausalLM(config).eval()


def fresh_ids(seed: int, length: int = 48, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 50280, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(REAL_CONFIGS))
def hf_model(request):
    return random_hf(request.param)


@torch.no_grad()
def test_object_and_directory_match_transformers(hf_model, tmp_path):
    ids = fresh_ids(seed=11)
    expected = hf_model(ids).logits
    ours = mambaquant.load(hf_model)
    assert isinstance(ours, MambaLM)
    assert rel_err(ours(ids), expected) < 1e-4
    hf_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = mambaquant.load(tmp_path)
    assert reloaded.config.n_layer == hf_model.config.num_hidden_layers
    assert rel_err(reloaded(ids), expected) < 1e-4


@torch.no_grad()
def test_untied_head_and_pytorch_bin(tmp_path):
    hf_model = random_hf("130m", seed=3, tie_word_embeddings=False, num_hidden_layers=4)
    with torch.no_grad():
        hf_model.lm_head.weight.normal_(0, 0.02)  # really different from the embedding
    ids = fresh_ids(seed=12)
    expected = hf_model(ids).logits
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    ours = mambaquant.load(tmp_path)
    assert not ours.config.tie_embeddings
    assert rel_err(ours(ids), expected) < 1e-4


@torch.no_grad()
def test_state_spaces_original_layout(tmp_path):
    """The non-hf state-spaces layout: config.json with d_model/n_layer/ssm_cfg, `backbone.embedding.weight`."""
    hf_model = random_hf("130m", seed=4, num_hidden_layers=3)
    tensors = {k.replace("embeddings", "embedding"): v.contiguous() for k, v in hf_model.state_dict().items()}
    tensors.pop("lm_head.weight", None)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    config = dict(d_model=768, n_layer=3, vocab_size=50277, ssm_cfg={}, rms_norm=True, residual_in_fp32=True,
                  fused_add_norm=True, pad_vocab_size_multiple=8)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = fresh_ids(seed=13)
    assert rel_err(mambaquant.load(tmp_path)(ids), hf_model(ids).logits) < 1e-4


@torch.no_grad()
def test_bare_checkpoint_file_infers_config(tmp_path):
    hf_model = random_hf("130m", seed=5, num_hidden_layers=2)
    save_file({k: v.clone() for k, v in hf_model.state_dict().items()}, tmp_path / "weights.safetensors")
    ours = mambaquant.load(tmp_path / "weights.safetensors")
    assert (ours.config.d_model, ours.config.n_layer, ours.config.dt_rank) == (768, 2, 48)
    ids = fresh_ids(seed=14)
    assert rel_err(ours(ids), hf_model(ids).logits) < 1e-4


@torch.no_grad()
def test_saved_model_loads_in_transformers(small_lm, tmp_path):
    """`mambaquant.save` writes the Hugging Face layout: transformers reads it and agrees with us."""
    mambaquant.save(small_lm, tmp_path / "out")
    hf_model = MambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(15))
    assert rel_err(hf_model(ids).logits, small_lm(ids)) < 1e-4
    assert rel_err(mambaquant.load(tmp_path / "out")(ids), small_lm(ids)) < 1e-6
