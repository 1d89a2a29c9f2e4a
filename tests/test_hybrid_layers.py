"""Our hybrid-model layers (runtime.attention, .mlp, .moe) against transformers' own, with the weights copied by
loaders.hybrid_layers: the attention of GraniteMoeHybrid (with RoPE and without), Bamba (half of each head
rotated), Nemotron-H, Falcon-H1, Jamba and Zamba2; the MLPs of all six; the MoEs of GraniteMoeHybrid, Nemotron-H
(sigmoid group routing; latent) and Jamba, each from the names on disk and from transformers' own."""

import pytest
import torch
from transformers import BambaConfig, FalconH1Config, GraniteMoeHybridConfig, JambaConfig, NemotronHConfig, Zamba2Config
from transformers.models.bamba import modeling_bamba as bamba
from transformers.models.falcon_h1 import modeling_falcon_h1 as falcon_h1
from transformers.models.granitemoehybrid import modeling_granitemoehybrid as granite
from transformers.models.jamba import modeling_jamba as jamba
from transformers.models.nemotron_h import modeling_nemotron_h as nemotron_h
from transformers.models.zamba2 import modeling_zamba2 as zamba2

from mambaquant.errors import InputError
from mambaquant.loaders.hybrid_layers import attention_weights, mlp_weights, moe_weights
from mambaquant.loaders.weights import assign_weights
from mambaquant.runtime.attention import Attention
from mambaquant.runtime.hybrid_config import AttentionConfig, MLPConfig, MoEConfig
from mambaquant.runtime.mlp import MLP
from mambaquant.runtime.moe import MoE
from mambaquant.runtime.sites import find_sites, name_sites

from .helpers import rel_err

BATCH, LENGTH = 2, 9
ZAMBA2 = {"hidden_size": 32, "num_attention_heads": 4, "n_mamba_heads": 8, "adapter_rank": 8, "num_mem_blocks": 2,
          "num_hidden_layers": 5, "attn_implementation": "eager",
          "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid", "hybrid"]}
# Zamba2's hybrid layers are 1, 3, 4; block 1 of 2 serves the second (layer 3), whose adapters are entry 1


def randomize(module: torch.nn.Module, std: float, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(std * torch.randn(tensor.shape, generator=generator))
    return module.eval()


def causal_mask(length: int) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]


def ours(module_class, config, mapped: dict) -> torch.nn.Module:
    module = assign_weights(module_class(config), mapped, "test").eval()
    name_sites(module)
    return module


# name -> (transformers' layer, its rotary embedding or None, the layer's other arguments, our config,
# attention_weights' adapter index)
def attention_case(name: str):
    if name in ("granite", "granite-nope"):
        rope = name == "granite"
        config = GraniteMoeHybridConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        attention_multiplier=0.3, attention_bias=True,
                                        position_embedding_type="rope" if rope else None,
                                        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                                        attn_implementation="eager")
        embedding = granite.GraniteMoeHybridRotaryEmbedding(config) if rope else None
        return (granite.GraniteMoeHybridAttention(config, 0), embedding, {},
                AttentionConfig(d_model=64, n_heads=4, n_kv_heads=2, qkv_bias=True, o_bias=True, scale=0.3,
                                rope=rope, rope_theta=5000.0), None)
    if name == "bamba":
        config = BambaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, attn_implementation="eager")
        return (bamba.BambaAttention(config, 0), bamba.BambaRotaryEmbedding(config), {},
                AttentionConfig(d_model=64, n_heads=4, n_kv_heads=1, rotary_fraction=0.5), None)
    if name == "nemotron_h":
        config = NemotronHConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                 layers_block_type=["full_attention"], attn_implementation="eager")
        return (nemotron_h.NemotronHAttention(config, 0), None, {},
                AttentionConfig(d_model=64, n_heads=4, n_kv_heads=2, head_dim=24, rope=False), None)
    if name == "falcon_h1":
        config = FalconH1Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                key_multiplier=0.7, attention_bias=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e11},
                                attn_implementation="eager")
        return (falcon_h1.FalconH1Attention(config, 0), falcon_h1.FalconH1RotaryEmbedding(config), {},
                AttentionConfig(d_model=64, n_heads=4, n_kv_heads=2, head_dim=24, qkv_bias=True, o_bias=True,
                                key_multiplier=0.7, rope_theta=1e11), None)
    if name == "jamba":
        config = JambaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, attn_implementation="eager")
        return (jamba.JambaAttention(config, 0), None, {},
                AttentionConfig(d_model=64, n_heads=8, n_kv_heads=2, rope=False), None)
    config = Zamba2Config(**ZAMBA2, use_mem_rope=True, use_shared_attention_adapter=True)
    return (zamba2.Zamba2Attention(config, layer_idx=-1, num_fwd_mem_blocks=3, block_id=1),
            zamba2.Zamba2RotaryEmbedding(config), {"layer_idx": 3},
            AttentionConfig(d_model=32, input_size=64, n_heads=4, scale=(16 / 2) ** -0.5, adapter_rank=8), 1)


ATTENTION = ["granite", "granite-nope", "bamba", "nemotron_h", "falcon_h1", "jamba", "zamba2"]


@pytest.fixture(scope="module", params=ATTENTION)
def attention_pair(request):
    layer, embedding, arguments, config, adapter = attention_case(request.param)
    randomize(layer, 0.15, seed=ATTENTION.index(request.param))

    def reference(x: torch.Tensor) -> torch.Tensor:
        rope = embedding(x, torch.arange(x.shape[1])[None]) if embedding is not None else None
        return layer(hidden_states=x, attention_mask=causal_mask(x.shape[1]), position_embeddings=rope,
                     **arguments)[0]

    return reference, ours(Attention, config, attention_weights(layer.state_dict(), "", adapter))


@torch.no_grad()
def test_attention_equals_transformers(attention_pair):
    run, attention = attention_pair
    for seed in (0, 1):
        x = torch.randn(BATCH, LENGTH, attention.config.input_size, generator=torch.Generator().manual_seed(seed))
        assert rel_err(attention(x), run(x)) < 1e-5


@torch.no_grad()
def test_attention_prefill_then_cached_steps_equal_the_full_forward(attention_pair):
    _, attention = attention_pair
    x = torch.randn(BATCH, LENGTH, attention.config.input_size, generator=torch.Generator().manual_seed(2))
    cache = attention.new_state(BATCH)
    steps = [attention(x[:, :4], cache)] + [attention(x[:, t : t + 1], cache) for t in range(4, LENGTH)]
    assert cache.length == LENGTH
    assert rel_err(torch.cat(steps, dim=1), attention(x)) < 1e-5


class Scale(torch.nn.Module):
    def forward(self, x):
        return 1.5 * x


def check_sites(module: torch.nn.Module, x: torch.Tensor, kinds: set[str]) -> dict[str, tuple]:
    """Every site of `module` is on the path (an op there changes the output); the shapes each site saw."""
    sites = find_sites(module)
    assert {site.kind for site in sites.values()} == kinds
    seen = {}
    for site in sites.values():
        site.observers.append(lambda s, t: seen.setdefault(s.name, tuple(t.shape)))
    before = module(x)
    for name, site in sites.items():
        site.observers.clear()
        site.op = Scale()
        assert rel_err(module(x), before) > 1e-3, name
        site.op = None
    return seen


@torch.no_grad()
def test_attention_sites_are_on_the_path_with_their_documented_shapes(attention_pair):
    _, attention = attention_pair
    c = attention.config
    x = torch.randn(BATCH, LENGTH, c.input_size, generator=torch.Generator().manual_seed(3))
    seen = check_sites(attention, x, {"q", "k", "v", "o_proj_in"})
    queries, keys = (BATCH, LENGTH, c.n_heads * c.head_dim), (BATCH, LENGTH, c.n_kv_heads * c.head_dim)
    assert seen == {"q": queries, "k": keys, "v": keys, "o_proj_in": queries}


# name -> (transformers' MLP, its other arguments, our config, mlp_weights' adapter index)
def mlp_case(name: str):
    if name == "granite":  # the shared_mlp, [gate; up] fused in input_linear
        layer = granite.GraniteMoeHybridMLP(GraniteMoeHybridConfig(hidden_size=64, shared_intermediate_size=48))
        return layer, {}, MLPConfig(d_model=64, d_ff=48), None
    if name == "bamba":
        layer = bamba.BambaMLP(BambaConfig(hidden_size=64, intermediate_size=48, mlp_bias=True))
        return layer, {}, MLPConfig(d_model=64, d_ff=48, bias=True), None
    if name == "jamba":
        layer = jamba.JambaMLP(JambaConfig(hidden_size=64, intermediate_size=48))
        return layer, {}, MLPConfig(d_model=64, d_ff=48), None
    if name == "falcon_h1":
        layer = falcon_h1.FalconH1MLP(FalconH1Config(hidden_size=64, intermediate_size=48, mlp_bias=True,
                                                     mlp_multipliers=[0.6, 1.7]))
        return layer, {}, MLPConfig(d_model=64, d_ff=48, bias=True, gate_multiplier=0.6, down_multiplier=1.7), None
    if name == "nemotron_h":
        layer = nemotron_h.NemotronHMLP(NemotronHConfig(hidden_size=64, intermediate_size=48, mlp_bias=True))
        return layer, {}, MLPConfig(d_model=64, d_ff=48, gated=False, activation="relu2", bias=True), None
    layer = zamba2.Zamba2MLP(Zamba2Config(**ZAMBA2, intermediate_size=40, add_bias_linear=True),
                             num_fwd_mem_blocks=3, block_id=1)
    return layer, {"layer_idx": 3}, MLPConfig(d_model=32, d_ff=40, activation="gelu", bias=True, adapter_rank=8), 1


MLPS = ["granite", "bamba", "jamba", "falcon_h1", "nemotron_h", "zamba2"]


@pytest.mark.parametrize("name", MLPS)
@torch.no_grad()
def test_mlp_equals_transformers_and_its_sites_are_on_the_path(name):
    layer, arguments, config, adapter = mlp_case(name)
    randomize(layer, 0.1, seed=10 + MLPS.index(name))
    mlp = ours(MLP, config, mlp_weights(layer.state_dict(), "", adapter))
    for seed in (0, 1):
        x = torch.randn(BATCH, LENGTH, config.d_model, generator=torch.Generator().manual_seed(seed))
        assert rel_err(mlp(x), layer(x, **arguments)) < 1e-5
    seen = check_sites(mlp, x, {"mlp_in", "down_in"})
    assert seen == {"mlp_in": (BATCH, LENGTH, config.d_model), "down_in": (BATCH, LENGTH, config.d_ff)}


def stacked_to_per_expert(state: dict, prefix: str) -> dict:
    """transformers' stacked experts (gate_up_proj = [gate; up], or up_proj alone; down_proj) as the checkpoints
    store them, one name per expert and projection."""
    stored = {name: tensor for name, tensor in state.items() if not name.startswith(prefix + "experts.")}
    parts = {}
    if prefix + "experts.gate_up_proj" in state:
        parts["gate_proj"], parts["up_proj"] = state[prefix + "experts.gate_up_proj"].chunk(2, dim=1)
    else:
        parts["up_proj"] = state[prefix + "experts.up_proj"]
    parts["down_proj"] = state[prefix + "experts.down_proj"]
    for part, stack in parts.items():
        for expert, tensor in enumerate(stack):
            stored[f"{prefix}experts.{expert}.{part}.weight"] = tensor
    return stored


# name -> (transformers' MoE forward, its state dict on disk and in transformers, moe_weights' arguments, our config)
def moe_case(name: str):
    if name == "granite":
        config = GraniteMoeHybridConfig(hidden_size=64, intermediate_size=32, num_local_experts=8,
                                        num_experts_per_tok=2, shared_intermediate_size=48)
        moe, shared = granite.GraniteMoeHybridMoE(config), granite.GraniteMoeHybridMLP(config)
        randomize(moe, 0.1, seed=20), randomize(shared, 0.1, seed=21)
        prefixed = {f"block_sparse_moe.{k}": v for k, v in moe.state_dict().items()}
        prefixed |= {f"shared_mlp.{k}": v for k, v in shared.state_dict().items()}
        disk_names = {"block_sparse_moe.experts.gate_up_proj": "block_sparse_moe.input_linear.weight",
                      "block_sparse_moe.experts.down_proj": "block_sparse_moe.output_linear.weight",
                      "block_sparse_moe.router.weight": "block_sparse_moe.router.layer.weight"}
        on_disk = {disk_names.get(k, k): v for k, v in prefixed.items()}

        def moe_and_shared_mlp(x: torch.Tensor) -> torch.Tensor:  # as GraniteMoeHybridDecoderLayer adds them
            return moe(x) + shared(x)

        return (moe_and_shared_mlp, [prefixed, on_disk], ("block_sparse_moe.", "shared_mlp."),
                MoEConfig(d_model=64, d_ff=32, n_experts=8, top_k=2, shared_d_ff=48))
    if name.startswith("nemotron_h"):
        latent = name == "nemotron_h-latent"
        config = NemotronHConfig(hidden_size=64, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                                 moe_shared_expert_intermediate_size=24, routed_scaling_factor=2.5,
                                 n_group=1 if latent else 4, topk_group=1 if latent else 2,
                                 norm_topk_prob=not latent, moe_latent_size=24 if latent else None,
                                 mlp_bias=latent)
        moe = randomize(nemotron_h.NemotronHMoE(config), 0.1, seed=22 + latent)
        state = {f"mixer.{k}": v for k, v in moe.state_dict().items()}
        return (moe, [state, stacked_to_per_expert(state, "mixer.")], ("mixer.", None),
                MoEConfig(d_model=64, d_ff=16, n_experts=8, top_k=3, scoring="sigmoid", norm_topk_prob=not latent,
                          score_correction=True, n_group=1 if latent else 4, topk_group=1 if latent else 2,
                          routed_scaling_factor=2.5, gated=False, activation="relu2", shared_d_ff=24,
                          latent_size=24 if latent else 0, bias=latent))
    config = JambaConfig(hidden_size=64, intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    moe = randomize(jamba.JambaSparseMoeBlock(config), 0.1, seed=24)
    state = {f"feed_forward.{k}": v for k, v in moe.state_dict().items()}
    return (moe, [state, stacked_to_per_expert(state, "feed_forward.")], ("feed_forward.", None),
            MoEConfig(d_model=64, d_ff=32, n_experts=8, top_k=2, norm_topk_prob=False))


MOES = ["granite", "nemotron_h", "nemotron_h-latent", "jamba"]


@pytest.mark.parametrize("name", MOES)
@torch.no_grad()
def test_moe_equals_transformers_from_either_naming(name):
    run, states, (prefix, shared_prefix), config = moe_case(name)
    for state in states:
        moe = ours(MoE, config, moe_weights(state, prefix, shared_prefix))
        for seed in (0, 1):
            x = torch.randn(BATCH, LENGTH, 64, generator=torch.Generator().manual_seed(seed))
            assert rel_err(moe(x), run(x)) < 1e-5


@pytest.mark.parametrize("name", MOES)
@torch.no_grad()
def test_moe_sites_are_on_the_path(name):
    _, states, (prefix, shared_prefix), config = moe_case(name)
    moe = ours(MoE, config, moe_weights(states[0], prefix, shared_prefix))
    x = torch.randn(BATCH, LENGTH, 64, generator=torch.Generator().manual_seed(5))
    kinds = {"router_in", "expert_in", "expert_down_in"} | ({"mlp_in", "down_in"} if config.shared_d_ff else set())
    kinds |= {"fc1_latent_in", "fc2_latent_in"} if config.latent_size else set()
    seen = check_sites(moe, x, kinds)
    assert seen["experts.expert_down_in"][::2] == (1, config.d_ff)  # (1, tokens of the first expert, d_ff)
    assert seen["expert_in"] == (BATCH, LENGTH, config.expert_width)


def test_a_router_choice_is_transformers_choice():
    """Nemotron-H's group routing: the experts chosen, not only the output, are transformers'."""
    _, states, _, config = moe_case("nemotron_h")
    reference = nemotron_h.NemotronHTopkRouter(NemotronHConfig(hidden_size=64, n_routed_experts=8,
                                                               num_experts_per_tok=3, n_group=4, topk_group=2,
                                                               routed_scaling_factor=2.5))
    reference.load_state_dict({"weight": states[0]["mixer.gate.weight"],
                               "e_score_correction_bias": states[0]["mixer.gate.e_score_correction_bias"]})
    moe = ours(MoE, config, moe_weights(states[0], "mixer."))
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, expected_weights, expected = reference(x)
        weights, experts = moe.router(x)
    order, expected_order = experts.argsort(dim=-1), expected.argsort(dim=-1)
    assert torch.equal(experts.gather(1, order), expected.gather(1, expected_order))
    assert rel_err(weights.gather(1, order), expected_weights.gather(1, expected_order)) < 1e-6


@pytest.mark.parametrize("make, field", [
    (lambda: AttentionConfig(n_heads=6, n_kv_heads=4), "n_heads 6 is not a multiple of n_kv_heads 4"),
    (lambda: AttentionConfig(rotary_fraction=1.5), "rotary_fraction must be a finite number > 0 and <= 1"),
    (lambda: AttentionConfig(rotary_fraction=0.0), "rotary_fraction must be a finite number > 0 and <= 1"),
    (lambda: AttentionConfig(d_model=64, n_heads=4, rotary_fraction=0.05), "rotates 0 channels"),
    (lambda: AttentionConfig(n_heads=True), "n_heads must be an integer"),
    (lambda: MLPConfig(d_ff=0), "d_ff must be an integer from 1"),
    (lambda: MLPConfig(activation="tanh"), "activation must be one of 'silu', 'gelu', 'relu2'"),
    (lambda: MLPConfig(gated=False, adapter_rank=4), "expected gated true or adapter_rank 0"),
    (lambda: MoEConfig(n_experts=4, top_k=5), "top_k 5 is above n_experts 4"),
    (lambda: MoEConfig(scoring="topk"), "scoring must be one of 'softmax', 'sigmoid'"),
    (lambda: MoEConfig(n_group=2), "softmax routing has no expert groups"),
    (lambda: MoEConfig(scoring="sigmoid", n_experts=8, n_group=3), "do not split into n_group 3 groups"),
    (lambda: MoEConfig(scoring="sigmoid", n_experts=8, n_group=2, topk_group=3), "topk_group 3 is above n_group 2"),
    (lambda: MoEConfig(scoring="sigmoid", n_experts=8, n_group=4, topk_group=1, top_k=3), "top_k 3 is above the 2"),
])
def test_bad_configs_raise_one_line_naming_the_field(make, field):
    with pytest.raises(InputError, match=field) as error:
        make()
    assert "\n" not in str(error.value)


def test_configs_round_trip_and_from_dict_names_the_file():
    for config in (AttentionConfig(d_model=64, n_heads=4, n_kv_heads=2, rotary_fraction=0.5), MLPConfig(),
                   MoEConfig(scoring="sigmoid", n_group=2, score_correction=True, shared_d_ff=8)):
        assert type(config).from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match=r"^config.json: n_heads 6 is not a multiple"):
        AttentionConfig.from_dict({"n_heads": 6, "n_kv_heads": 4}, where="config.json")


def test_missing_weights_are_named():
    with pytest.raises(InputError, match=r"ckpt: missing weight layers.0.mlp.up_proj.weight"):
        mlp_weights({"layers.0.mlp.down_proj.weight": torch.zeros(2, 2)}, "layers.0.mlp.", source="ckpt")
    experts = {f"m.experts.{e}.{part}.weight": torch.zeros(2, 2) for e in (0, 2) for part in ("up_proj", "down_proj")}
    with pytest.raises(InputError, match=r"missing weight m.experts.1.up_proj.weight; expected experts numbered 0 to"):
        moe_weights({"m.router.weight": torch.zeros(3, 2), **experts}, "m.")
