"""compressed-tensors export for vLLM (`quantize --target vllm`, `export --to compressed-tensors`), verified with
transformers and the compressed-tensors package on the CPU:
- with decompression (transformers' `dequantize=True`, or compressed-tensors' own compressor for each layer under
  its own config group, since transformers' dequantize path takes one scheme for every dense layer), the weights are
  our codes times our scales exactly, and the logits equal our runtime's with the activation quantizers off (W4A16:
  our runtime's own) within 1e-5 of the logits' scale;
- without decompression, transformers runs compressed-tensors' own static / per-token int8 input quantization: each
  quantized linear alone computes ours within 1e-5 of its output's scale (static codes clamped to [-128, 127], as
  vLLM's are); the whole model differs by float rounding (transformers' Mamba-2 and attention code, and with the
  out_proj / down_proj Hadamards compressed-tensors' dense product where we run a fast Hadamard transform) that now
  and then moves an input across a rounding boundary of the static int8 quantization, and the next layers carry it
  on: measured on 1,024 bytes of validation text, bits per byte within 0.0005 of ours (mamba2-shakespeare rtn
  W8A8 static 0.0002, quarot W8A8 static 0.0004; hybrid-shakespeare quarot W8A8 static 0.0004, mambaquant W8A8
  per token 0.0001) and 99 % or more of the argmax predictions equal: held here to 0.002 and 98 %.
  benchmarks/vllm_cpu.py serves the same exports in vLLM's CPU build (BENCHMARKS.md).
- what vLLM cannot hold is refused in one line, exit 2, nothing written."""

import copy
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import mambaquant
from mambaquant.data import tinyshakespeare_validation
from mambaquant.errors import InputError
from mambaquant.exporters.compressed_tensors import export_compressed_tensors, pack_int32
from mambaquant.quant.linear import QuantizedLinear
from mambaquant.quant.quantizer import dequantize_weight

from .helpers import run_cli

compressed_tensors = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.transform import TransformConfig, apply_transform_config  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

IDS = torch.tensor([list(tinyshakespeare_validation()[:1024])])


def quantized(source, **options):
    return mambaquant.quantize(source, target="vllm", calib_samples=4, calib_len=256, progress=False, **options)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return (out.logits if hasattr(out, "logits") else out)[0].float()


def weights_only(model):
    """Our model with every linear's input quantizer off: what a decompressed (dequantized) checkpoint computes."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.input_quantizer = None
    return model


def bits(logits_: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits_[:-1].double(), IDS[0, 1:]).item() / math.log(2)


def with_transforms(hf, directory) -> None:
    """compressed-tensors' own transform, from the checkpoint's transform_config, with its matrices read from the
    checkpoint (transformers loads no transform_config; vLLM does)."""
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    if "transform_config" not in config:
        return
    apply_transform_config(hf, TransformConfig.model_validate(config["transform_config"]))
    stored = load_file(str(directory / "model.safetensors"))
    own = [name for name in hf.state_dict() if "_hadamard_" in name]
    assert len(own) == sum("_hadamard_" in name for name in stored)
    hf.load_state_dict({name: stored[name.replace("model.", "backbone.", 1)] for name in own}, strict=False)


def load_hf(directory, dequantize: bool):
    hf = AutoModelForCausalLM.from_pretrained(directory, quantization_config=CompressedTensorsConfig(
        dequantize=dequantize), dtype=torch.float32).eval()
    with_transforms(hf, directory)
    return hf


def decompressed_hf(directory):
    """A dense transformers model whose quantized layers compressed-tensors' own compressors decompressed, each
    under the config group that names it (transformers' dequantize path takes one group for every layer)."""
    config = AutoConfig.from_pretrained(directory)
    quantization = QuantizationConfig.model_validate(config.quantization_config)
    del config.quantization_config
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stored = load_file(str(directory / "model.safetensors"))
    layers = {name[:-len(".weight_scale")] for name in stored if name.endswith(".weight_scale")}
    dense = {name: tensor for name, tensor in stored.items()
             if name.rpartition(".")[0] not in layers and not name.endswith("_input.weight")}
    for layer in layers:
        group = [g for g in quantization.config_groups.values() if any(re.match(t[3:], layer) for t in g.targets)]
        assert len(group) == 1, layer
        scheme = group[0]
        parts = {name[len(layer) + 1:]: tensor for name, tensor in stored.items()
                 if name.startswith(layer + ".") and "_input." not in name}
        compressor = BaseCompressor.get_value_from_registry(scheme.format or quantization.format)
        dense[layer + ".weight"] = compressor.decompress(parts, scheme)["weight"].float()
    own = hf.state_dict()
    renamed = {name if name in own else name.replace("backbone.", "model.", 1): tensor for name, tensor in dense.items()}
    missing, unexpected = hf.load_state_dict(renamed, strict=False)
    assert not unexpected and not [name for name in missing if "lm_head" not in name], (missing, unexpected)
    with_transforms(hf, directory)
    return hf


def check_weights_exact(model, hf) -> None:
    """Every quantized linear's dense weight in transformers is our codes times our scales, bit for bit."""
    hf_weights = {name.replace("model.", "", 1).replace("backbone.", "", 1): tensor
                  for name, tensor in hf.state_dict().items()}
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(hf_weights[name + ".weight"].float(), dequantize_weight(module.codes, module.scale)), name
            checked += 1
    assert checked


@pytest.fixture(scope="module")
def mamba2_static(tmp_path_factory):
    model = quantized("mamba2-shakespeare", method="quarot", w_bits=8, a_bits=8, act_granularity="tensor")
    directory = export_compressed_tensors(model, tmp_path_factory.mktemp("ct") / "mamba2")
    return model, directory


@pytest.fixture(scope="module")
def hybrid_token(tmp_path_factory):
    model = quantized("hybrid-shakespeare", method="mambaquant", w_bits=8, a_bits=8, act_granularity="token")
    directory = export_compressed_tensors(model, tmp_path_factory.mktemp("ct") / "hybrid")
    return model, directory


def test_mamba2_w8a8_static_layout(mamba2_static):
    model, directory = mamba2_static
    config = json.loads((directory / "config.json").read_text())
    q = config["quantization_config"]
    assert config["model_type"] == "mamba2" and not config["tie_word_embeddings"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized" and q["ignore"] == ["lm_head"]
    (group,) = q["config_groups"].values()
    assert sorted(group["targets"]) == sorted(rf"re:.*layers\.{i}\.mixer\.{name}$" for i in range(4)
                                              for name in ("in_proj", "out_proj"))
    assert group["input_activations"]["strategy"] == "tensor" and not group["input_activations"]["dynamic"]
    (transform,) = q["transform_config"]["config_groups"].values()
    assert transform["apply"][0]["location"] == "input" and len(transform["apply"][0]["targets"]) == 4
    QuantizationConfig.model_validate({key: q[key] for key in ("config_groups", "format", "ignore", "kv_cache_scheme",
                                                               "quantization_status")})  # compressed-tensors' own
    TransformConfig.model_validate(q["transform_config"])
    stored = load_file(str(directory / "model.safetensors"))
    linear = model.layers[0].mixer.out_proj
    assert torch.equal(stored["backbone.layers.0.mixer.out_proj.weight"], linear.codes)
    assert stored["backbone.layers.0.mixer.out_proj.input_scale"].item() == \
        linear.input_quantizer.static_scale_and_zero()[0].item()
    assert "backbone.layers.0.mixer.conv1d.weight" in stored and "lm_head.weight" in stored


def test_mamba2_w8a8_static_in_transformers(mamba2_static):
    model, directory = mamba2_static
    ours, ours_weights_only = logits(model), logits(weights_only(model))
    scale = ours.abs().max().item()
    hf = load_hf(directory, dequantize=True)
    check_weights_exact(model, hf)
    assert (logits(hf) - ours_weights_only).abs().max().item() < 1e-5 * scale
    theirs = logits(load_hf(directory, dequantize=False))  # compressed-tensors' static int8 inputs
    assert abs(bits(theirs) - bits(ours)) < 0.002
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() > 0.98


def test_without_a_transform_the_static_inputs_are_ours(tmp_path):
    model = quantized("mamba2-shakespeare", method="rtn", w_bits=8, a_bits=8, act_granularity="tensor")
    directory = export_compressed_tensors(model, tmp_path / "rtn")
    assert "transform_config" not in json.loads((directory / "config.json").read_text())["quantization_config"]
    hf = load_hf(directory, dequantize=False)
    ours, theirs = logits(model), logits(hf)  # (the first forward decompresses the weights)
    for layer in range(4):  # each quantized linear alone: the same static int8 input quantization, codes -128..127
        for name in ("in_proj", "out_proj"):
            x = torch.randn(2, 64, getattr(model.layers[layer].mixer, name).in_features) * 4
            with torch.no_grad():
                a, b = getattr(model.layers[layer].mixer, name)(x), getattr(hf.backbone.layers[layer].mixer, name)(x)
            assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item()
    assert abs(bits(theirs) - bits(ours)) < 0.002
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() > 0.98


def test_hybrid_w8a8_per_token_in_transformers(hybrid_token):
    model, directory = hybrid_token
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "nemotron_h" and config["hybrid_override_pattern"] == "M-M*-M"
    transforms = config["quantization_config"]["transform_config"]["config_groups"]
    targets = {name: scheme["apply"][0]["targets"] for name, scheme in transforms.items()}
    assert sorted(map(len, targets.values())) == [2, 3]  # down_proj of both MLPs, out_proj of the three Mamba-2
    ours = logits(model)
    hf = load_hf(directory, dequantize=True)
    check_weights_exact(model, hf)
    assert (logits(hf) - logits(weights_only(model))).abs().max().item() < 1e-5 * ours.abs().max().item()
    theirs = logits(load_hf(directory, dequantize=False))  # compressed-tensors' dynamic per-token int8 inputs
    assert abs(bits(theirs) - bits(ours)) < 0.002
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() > 0.98


@pytest.mark.parametrize("source", ["mamba2-shakespeare", "hybrid-shakespeare"])
def test_w4a16_keeps_in_proj_at_8_bits_and_decompresses_exactly(source, tmp_path):
    model = quantized(source, method="gptq", w_bits=4, a_bits=16, weight_group_size=128)
    assert model.layers[0].mixer.in_proj.bits == 8 and model.layers[0].mixer.out_proj.bits == 4
    assert any("int8 per channel: in_proj" in line for line in model.quantization_report.weights)
    directory = export_compressed_tensors(model, tmp_path / "w4a16")
    q = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert q["format"] == "pack-quantized"
    groups = list(q["config_groups"].values())
    assert all(r"mixer\.in_proj$" in target for g in groups if g["weights"]["num_bits"] == 8 for target in g["targets"])
    assert any(g["weights"]["num_bits"] == 4 and g["weights"]["group_size"] == 128 for g in groups)
    hf = decompressed_hf(directory)
    check_weights_exact(model, hf)
    ours = logits(model)
    assert (logits(hf) - ours).abs().max().item() < 1e-5 * ours.abs().max().item()


def test_single_scheme_w4a16_in_transformers_dequantize(tmp_path):
    """Widths that vLLM's 4-bit kernels hold everywhere (in_proj 384 = 2 x 128 + 2 x 2 x 16 + 64 outputs): one
    scheme, which transformers' own dequantize path decompresses."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    hf_model = Mamba2ForCausalLM(Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16,
                                              num_heads=64, head_dim=2, n_groups=2, initializer_range=0.02)).eval()
    model = quantized(mambaquant.load(hf_model), method="rtn", w_bits=4, a_bits=16)
    assert {m.bits for m in model.modules() if isinstance(m, QuantizedLinear)} == {4}
    directory = export_compressed_tensors(model, tmp_path / "w4")
    assert len(json.loads((directory / "config.json").read_text())["quantization_config"]["config_groups"]) == 1
    hf = load_hf(directory, dequantize=True)
    check_weights_exact(model, hf)
    ours = logits(model)
    assert (logits(hf) - ours).abs().max().item() < 1e-5 * ours.abs().max().item()


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors_own(bits):
    codes = torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (24, 64), dtype=torch.int8)
    codes[0, :4] = torch.tensor([-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1, 0, -1], dtype=torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes, bits))


def test_what_vllm_cannot_hold_is_refused_in_one_line(tmp_path):
    with pytest.raises(InputError, match="Mamba-1 mixers"):
        quantized("mamba-shakespeare", method="rtn")
    for options, message in [(dict(w_bits=4, a_bits=4), "W4A4"), (dict(w_bits=4, a_bits=8), "int8 weights only"),
                             (dict(act_granularity="auto"), "statically per tensor or dynamically per token"),
                             (dict(weight_group_size=128), "per output channel")]:
        with pytest.raises(InputError, match=message):
            quantized("mamba2-shakespeare", method="rtn", **options)
    runtime = mambaquant.quantize("mamba2-shakespeare", method="rtn", calib_samples=2, calib_len=64)
    with pytest.raises(InputError, match="quantize it with --target vllm"):
        export_compressed_tensors(runtime, tmp_path / "runtime")
    assert not (tmp_path / "runtime").exists()


def test_cli_paths_and_bad_input(tmp_path):
    out = tmp_path / "q"
    code, stdout, stderr = run_cli("quantize", "mamba2-shakespeare", "--method", "quamba", "--target", "vllm",
                                   "--calib-samples", "2", "--calib-len", "64", "--no-eval", "--out", str(out),
                                   "--export", "compressed-tensors")
    assert code == 0, stderr
    assert (out / "vllm" / "config.json").is_file() and "target: vllm" in (out / "MODEL_CARD.md").read_text()
    code, stdout, stderr = run_cli("export", str(out), "--to", "compressed-tensors", "--out", str(tmp_path / "again"))
    assert code == 0 and "vllm serve" in stdout, stderr
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "vllm" / "model.safetensors").read_bytes()
    for args, message in [
        (("export", "mamba2-shakespeare", "--to", "compressed-tensors", "--out", str(tmp_path / "fp")),
         "a full-precision model"),
        (("export", str(out), "--to", "compressed-tensors", "--out", str(tmp_path / "again")), "already exists"),
        (("quantize", "mamba-shakespeare", "--method", "rtn", "--target", "vllm", "--no-eval", "--out",
          str(tmp_path / "m1")), "Mamba-1 mixers"),
        (("quantize", "mamba2-shakespeare", "--method", "rtn", "--target", "llama.cpp", "--no-eval", "--out",
          str(tmp_path / "ll"), "--export", "compressed-tensors"), "expected --out DIR and --target vllm"),
    ]:
        code, stdout, stderr = run_cli(*args)
        assert code == 2 and message in stderr and "Traceback" not in stderr and len(stderr.splitlines()) == 1, \
            (args, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "q"]
