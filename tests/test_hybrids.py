"""Hybrid language models (Granite-4.0-H, Bamba, Nemotron-H, Jamba, Falcon-H1, Zamba2) in our runtime, equal to transformers' CPU path: random
models of the published configurations' shapes at reduced depth and width (initializer_range 0.02), in memory and
from save_pretrained directories in float32 and bfloat16, prefill and cached decode; bad configs and checkpoints in
one line."""

import json
import warnings

import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.runtime import HybridLMConfig

from .helpers import rel_err

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=64, initializer_range=0.02, num_attention_heads=4, num_key_value_heads=2)
# name -> (transformers class, config fields): the published configurations' features, a few layers
ARCHITECTURES = {
    # granite-4.0-h-350m / 1b: dense (no experts), no positional encoding, muP multipliers, tied embeddings
    "granite-4.0-h dense": ("GraniteMoeHybrid", dict(
        COMMON, num_hidden_layers=4, layer_types=["mamba", "mamba", "attention", "mamba"], mamba_n_heads=8,
        mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, num_local_experts=0, shared_intermediate_size=96,
        embedding_multiplier=12.0, residual_multiplier=0.246, attention_multiplier=0.0078125, logits_scaling=4.0,
        position_embedding_type="nope", tie_word_embeddings=True)),
    # granite-4.0-h-tiny / small: experts beside the shared MLP (with RoPE here, which the Granite-4.0-H configs
    # leave out, to cover it)
    "granite-4.0-h moe": ("GraniteMoeHybrid", dict(
        COMMON, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=16,
        mamba_d_state=16, mamba_n_groups=2, num_local_experts=6, num_experts_per_tok=2, intermediate_size=32,
        shared_intermediate_size=64, position_embedding_type="rope", residual_multiplier=0.5)),
    # Bamba-9B: attention layers among Mamba-2 ones, half of each head rotated
    "bamba": ("Bamba", dict(COMMON, num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16,
                            mamba_d_state=16, intermediate_size=128)),
    # Nemotron-H-4B / Nemotron-Nano-2: single-sublayer blocks, squared-ReLU MLPs, n_groups 8, heads x head_dim not
    # a multiple of hidden_size
    "nemotron-h dense": ("NemotronH", dict(
        COMMON, layers_block_type=["mamba", "mlp", "mamba", "attention", "mlp", "mamba", "mlp"], head_dim=16,
        mamba_num_heads=24, mamba_head_dim=8, ssm_state_size=16, n_groups=8, intermediate_size=160)),
    # Nemotron-3-Nano: sigmoid-routed experts in groups with score correction, a shared expert, latent projections
    "nemotron-h moe": ("NemotronH", dict(
        COMMON, layers_block_type=["mamba", "moe", "attention", "moe", "mamba"], head_dim=16, mamba_num_heads=8,
        mamba_head_dim=16, ssm_state_size=16, n_groups=2, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, moe_latent_size=32,
        routed_scaling_factor=2.5, intermediate_size=64)),
    # Jamba: Mamba-1 blocks with weighted dt/B/C norms, attention every 4th layer, experts every 2nd (no RoPE)
    "jamba": ("Jamba", dict(
        COMMON, num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
        expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, intermediate_size=96, mamba_d_state=8,
        mamba_expand=2, mamba_dt_rank=8, use_mamba_kernels=False)),
    # Falcon-H1 (-0.5B / -Tiny): Mamba-2 and attention side by side in every layer, muP multipliers everywhere,
    # mamba_d_ssm set directly, the gated norm's three forms, tied embeddings, a large rope_theta
    **{f"falcon-h1 {norm}": ("FalconH1", dict(
        COMMON, num_hidden_layers=2, head_dim=24, mamba_d_ssm=96, mamba_n_heads=6, mamba_d_head=16, mamba_n_groups=2,
        mamba_d_state=8, intermediate_size=80, mamba_rms_norm=norm != "no norm",
        mamba_norm_before_gate=norm == "norm before gate", tie_word_embeddings=norm == "no norm",
        rope_parameters={"rope_theta": 1e11, "rope_type": "default"}, embedding_multiplier=5.0,
        lm_head_multiplier=0.125, attention_in_multiplier=0.7, attention_out_multiplier=0.9, key_multiplier=0.4,
        ssm_in_multiplier=1.3, ssm_out_multiplier=0.6, ssm_multipliers=[0.8, 1.2, 0.5, 1.7, 0.9],
        mlp_multipliers=[0.6, 1.4]))
       for norm in ("norm before gate", "norm after gate", "no norm")},
    # Zamba2-1.2B / 2.7B / 7B: hybrid layers taking turns among num_mem_blocks shared attention + MLP blocks that
    # read [hidden state, embedding output], per-layer adapters, dt clamped below at time_step_min; one block without
    # attention adapters or RoPE, or two with both and biases (transformers' k and v adapters are 2 x hidden_size
    # wide: they need as many key/value heads as query heads)
    "zamba2 one block": ("Zamba2", dict(
        COMMON, num_hidden_layers=4, layers_block_type=["hybrid", "mamba", "hybrid", "mamba"], n_mamba_heads=8,
        mamba_d_state=16, mamba_ngroups=1, intermediate_size=96, num_mem_blocks=1, adapter_rank=8)),
    "zamba2 two blocks": ("Zamba2", dict(
        COMMON, num_key_value_heads=4, num_hidden_layers=5,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid"],
        n_mamba_heads=4, mamba_d_state=16, mamba_ngroups=2, intermediate_size=80, num_mem_blocks=2,
        use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True, add_bias_linear=True)),
}


def reference(name: str, seed: int = 0):
    kind, fields = ARCHITECTURES[name]
    config = getattr(transformers, f"{kind}Config")(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():  # the published models' parameters are not their initialisation: move them off it
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(("norm.weight", "layernorm.weight", ".D", "dt_bias", "dt_proj.bias")):
                parameter.add_(0.2 * torch.randn(parameter.shape))
            if parameter_name.endswith("e_score_correction_bias"):
                parameter.copy_(0.05 * torch.randn(parameter.shape))
    return model


def ours_with_ids(names) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Our model of each named architecture (loaded from its transformers reference), calibration token ids and
    fresh evaluation ids: what the method tests on the hybrids share."""
    generator = torch.Generator().manual_seed(11)
    calib = torch.randint(0, COMMON["vocab_size"], (2, 24), generator=generator)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 19), generator=generator)
    return {name: mambaquant.load(reference(name)) for name in names}, calib, ids


def logits(model, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(ids)
        return out if isinstance(out, torch.Tensor) else out.logits


def decoded(model, ids, prefill: int):
    cache = model.new_cache(ids.shape[0])
    with torch.no_grad():
        steps = [model(ids[:, :prefill], cache)] + [model(ids[:, i : i + 1], cache) for i in range(prefill, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_equal_to_transformers_in_memory_prefill_and_decode(name):
    hf = reference(name)
    ours = mambaquant.load(hf)
    for seed in (1, 2):
        ids = torch.randint(0, COMMON["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(seed))
        expected = logits(hf, ids)
        assert rel_err(logits(ours, ids), expected) < 1e-5
        assert rel_err(decoded(ours, ids, 13), expected) < 1e-5


@pytest.mark.parametrize("name", ["granite-4.0-h moe", "nemotron-h moe", "jamba", "falcon-h1 norm before gate",
                                  "zamba2 one block", "zamba2 two blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_to_transformers_from_a_saved_directory(name, dtype, tmp_path):
    reference(name).to(dtype).save_pretrained(tmp_path)
    kind = ARCHITECTURES[name][0]
    hf = getattr(transformers, f"{kind}ForCausalLM").from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = mambaquant.load(tmp_path)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 15), generator=torch.Generator().manual_seed(3))
    assert rel_err(logits(ours, ids), logits(hf, ids)) < 1e-5


def test_each_multiplier_matters():
    """The equality above is not one a model without Granite's multipliers would meet: each changes the logits."""
    hf = reference("granite-4.0-h dense")
    ours = mambaquant.load(hf)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(4))
    expected = logits(ours, ids)
    for modules, field in (("model", "embedding_multiplier"), ("model", "logits_divisor"),
                           ("blocks", "multiplier")):
        changed = mambaquant.load(hf)
        for module in [changed] if modules == "model" else changed.layers:
            setattr(module, field, 1.0)
        assert rel_err(logits(changed, ids), expected) > 1e-2, field


def saved_config(tmp_path, name: str, **changes) -> None:
    reference(name).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("name, changes, words", [
    ("granite-4.0-h dense", {"layer_types": ["mamba", "conv", "attention", "mamba"]},
     "layer_types[1] must be one of"),
    ("nemotron-h dense", {"num_key_value_heads": 3}, "n_heads 4 is not a multiple of n_kv_heads 3"),
    ("nemotron-h moe", {"num_experts_per_tok": 9}, "top_k 9 is above n_experts 8"),
    ("bamba", {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 1.5, "rope_type": "default"}},
     "partial_rotary_factor 1.5; expected a fraction in (0, 1]"),
    ("bamba", {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn"}}, "rope_type 'yarn'"),
    ("bamba", {"attn_layer_indices": [5]}, "attn_layer_indices names layer 5"),
    ("granite-4.0-h moe", {"mamba_d_head": 12}, "weight model.layers.0.mamba."),
    ("nemotron-h dense", {"layers_block_type": ["mamba", "mlp"]}, "unexpected weight(s)"),
    ("zamba2 one block", {"n_mamba_heads": 5}, "does not split into n_mamba_heads 5 heads"),
    ("zamba2 one block", {"layers_block_type": ["hybrid", "mamba", "attention", "mamba"]},
     "layers_block_type[2] must be one of"),
])
def test_bad_configs_and_checkpoints_are_one_line(name, changes, words, tmp_path, cli):
    from .cli_cases import assert_refused

    saved_config(tmp_path, name, **changes)
    assert_refused(cli.run("eval", tmp_path, "--eval-samples", "1"), words)


def test_zamba2_blocks_that_transformers_left_untied_are_refused():
    """transformers ties Zamba2's shared blocks only with tie_word_embeddings; untied copies that differ are
    refused (our hybrid layers share one set of weights)."""
    fields = ARCHITECTURES["zamba2 two blocks"][1]
    hf = transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**fields, tie_word_embeddings=False))
    with pytest.raises(InputError, match="model.layers.4.shared_transformer.* differs from model.layers.1"):
        mambaquant.load(hf)


def test_a_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    reference("bamba").save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(InputError, match="missing weight model.layers.1.self_attn.k_proj.weight"):
        mambaquant.load(tmp_path)


def test_a_hybrid_config_round_trips_and_is_checked():
    config = mambaquant.load(reference("nemotron-h moe")).config
    assert HybridLMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(InputError, match=r"blocks\[1\] must be one of"):
        HybridLMConfig.from_dict({**config.to_dict(), "blocks": ["mamba2", "convolution"]})
    with pytest.raises(InputError, match="blocks has mlp blocks and mlp is NoneType"):
        HybridLMConfig.from_dict({**config.to_dict(), "blocks": ["mamba2", "mlp"]})


@pytest.fixture(scope="module")
def byte_hybrid():
    """A byte-level hybrid of every block kind (random weights)."""
    return mambaquant.build({
        "architecture": "hybrid-lm", "vocab_size": 256, "d_model": 32, "blocks": ["mamba2", "attention", "mlp", "moe"],
        "mamba2": {"d_model": 32, "head_dim": 8, "d_state": 8}, "attention": {"d_model": 32, "n_heads": 4},
        "mlp": {"d_model": 32, "d_ff": 64}, "moe": {"d_model": 32, "d_ff": 16, "n_experts": 4, "top_k": 2}}, seed=3)


def test_lm_eval_scores_and_generates_with_a_hybrid(byte_hybrid):
    """Scoring shares a prefilled context between choices (copied KV caches included); prompts of different
    lengths decode one at a time, each equal to the runtime's own greedy decoding."""
    from mambaquant.evaluation import lm_eval
    from mambaquant.evaluation.harness import MambaQuantLM
    from mambaquant.evaluation.local_tasks import LMEvalConfig

    (_, result), = lm_eval(byte_hybrid, LMEvalConfig("shakespeare_mc", limit=8), "hybrid")
    assert result.samples == 8 and 0 <= result.value <= 100
    prompts = ["ROMEO:", "KING RICHARD III:\nNow is"]
    greedy = [bytes(byte_hybrid.generate(torch.tensor([list(p.encode())]), 6, temperature=0)[0].tolist())
              .decode(errors="replace") for p in prompts]
    assert MambaQuantLM(byte_hybrid, progress=False).generate(prompts, [[], []], 6, 0.0) == greedy


@pytest.mark.parametrize("name", ["nemotron-h moe", "jamba", "falcon-h1 no norm", "zamba2 two blocks"])
def test_a_hybrid_saves_and_loads_back_bit_for_bit(name, tmp_path):
    """Our own layout (config.json with architecture hybrid-lm, our tensor names), weights shared across depths
    (Zamba2) and tied heads stored once."""
    ours = mambaquant.load(reference(name))
    back = mambaquant.load(mambaquant.save(ours, tmp_path / "saved"))
    ids = torch.randint(0, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(5))
    assert back.config == ours.config and torch.equal(logits(back, ids), logits(ours, ids))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architecture"] == "hybrid-lm"


def test_what_does_not_take_hybrids_yet_refuses_in_one_line(byte_hybrid, tmp_path):
    from mambaquant.exporters.gguf import export_gguf

    with pytest.raises(InputError, match="a hybrid of mamba2, attention"):
        export_gguf(byte_hybrid, tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())
