"""GGUF export to llama.cpp: the codes read back bit-exact with the gguf package, a float export computes our
runtime's logits in llama.cpp, a `--target llama.cpp` export computes what our simulation does (bits per
byte within 0.003 on 1,024 bytes of validation text, more than 98 % of the argmax predictions equal; one quantized
layer alone within 1e-4 of the logits' scale; benchmarks/gguf_export.py measures 0.0001 on the whole split), and what llama.cpp cannot run is refused in one line."""

import math

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import FalconMambaConfig, FalconMambaForCausalLM, Mamba2Config, Mamba2ForCausalLM

import mambaquant
from mambaquant.data import tinyshakespeare_validation
from mambaquant.errors import InputError
from mambaquant.exporters.gguf import export_gguf
from mambaquant.exporters.llama_run import LlamaCppModel
from mambaquant.quant.linear import QuantizedLinear

from .helpers import run_cli

TEXT = list(tinyshakespeare_validation()[:1024])


def llama_logits(path, ids) -> np.ndarray:
    with LlamaCppModel(path) as llm:
        return llm.logits(ids)


def ours(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def bits_per_token(logits: np.ndarray, ids: list[int]) -> float:
    log_probs = torch.log_softmax(torch.tensor(logits[:-1]).double(), -1)
    return -log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item() / math.log(2)


def random_mamba2(**overrides):
    torch.manual_seed(0)
    values = {**dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16, num_heads=4, head_dim=32,
                     n_groups=2, initializer_range=0.02), **overrides}
    return mambaquant.load(Mamba2ForCausalLM(Mamba2Config(**values)).eval())


def random_falcon():
    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8, mixer_rms_eps=1e-5,
                               initializer_range=0.02, tie_word_embeddings=False)
    return mambaquant.load(FalconMambaForCausalLM(config).eval())


@pytest.mark.parametrize("source", ["mamba-shakespeare", "mamba2-shakespeare", "falcon", "mamba2-groups"])
def test_a_float_export_computes_our_logits_in_llama_cpp(source, tmp_path):
    model = {"falcon": random_falcon, "mamba2-groups": random_mamba2}.get(source, lambda: mambaquant.load(source))()
    path = export_gguf(model, tmp_path / "model.gguf")
    assert relative(llama_logits(path, TEXT[:200]), ours(model, TEXT[:200])) < 1e-4


def block_values(tensor) -> np.ndarray:
    """A GGUF tensor's values as llama.cpp reads them (gguf's reference dequantization)."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


@pytest.mark.parametrize("w_bits,group", [(8, 0), (4, 0), (4, 64), (8, 32)])
@pytest.mark.parametrize("source", ["mamba-shakespeare", "mamba2-shakespeare"])
def test_the_codes_read_back_bit_exact(source, w_bits, group, tmp_path):
    quantized = mambaquant.quantize(source, method="gptq", w_bits=w_bits, target="llama.cpp", weight_group_size=group,
                                    calib_samples=2, calib_len=64)
    path = export_gguf(quantized, tmp_path / "model.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = {"layers.0.mixer.in_proj": "blk.0.ssm_in.weight", "layers.1.mixer.out_proj": "blk.1.ssm_out.weight",
             "lm_head": "token_embd.weight"}
    if source == "mamba-shakespeare":
        names["layers.0.mixer.ssm.x_proj"] = "blk.0.ssm_x.weight"
        assert tensors["blk.0.ssm_dt.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # input width 12
    modules = dict(quantized.named_modules())
    expected_type = gguf.GGMLQuantizationType.Q8_0 if w_bits == 8 else gguf.GGMLQuantizationType.Q4_0
    for ours_name, gguf_name in names.items():
        linear, tensor = modules[ours_name], tensors[gguf_name]
        assert isinstance(linear, QuantizedLinear) and tensor.tensor_type == expected_type
        values = block_values(tensor)
        assert np.array_equal(values, linear.dequantized_weight().numpy())  # codes times float16 scales, bit-exact
        if w_bits == 8:  # Q8_0's bytes: each block a float16 scale, then the 32 codes themselves
            codes = tensor.data.reshape(linear.out_features, -1, 34)[:, :, 2:].view(np.int8)
            assert np.array_equal(codes.reshape(linear.out_features, -1), linear.codes.numpy())


@pytest.mark.parametrize("source", ["mamba-shakespeare", "mamba2-shakespeare"])
def test_a_quantized_export_gives_the_simulations_numbers(source, tmp_path):
    quantized = mambaquant.quantize(source, method="mambaquant+", w_bits=4, target="llama.cpp", calib_samples=4,
                                    calib_len=128)
    path = export_gguf(quantized, tmp_path / "model.gguf")
    theirs, simulated = llama_logits(path, TEXT), ours(quantized, TEXT)
    assert abs(bits_per_token(theirs, TEXT) - bits_per_token(simulated, TEXT)) < 0.003
    assert (theirs.argmax(-1) == simulated.argmax(-1)).mean() > 0.98
    fp = ours(mambaquant.load(source), TEXT)
    assert abs(bits_per_token(fp, TEXT) - bits_per_token(simulated, TEXT)) > 0.003  # the quantization is visible


def only_one_quantized(quantized, keep: str):
    """The model with every quantized linear but `keep` turned back into a float one holding its dequantized
    weight (the tied embedding gets its own float copy): llama.cpp then quantizes one product's input."""
    quantized.embedding = nn.Embedding.from_pretrained(quantized.lm_head.dequantized_weight())
    quantized.config.tie_embeddings = False
    for owner in list(quantized.modules()):
        for name, child in list(owner.named_children()):
            if isinstance(child, QuantizedLinear) and child is not dict(quantized.named_modules())[keep]:
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = child.dequantized_weight()
                if child.bias is not None:
                    linear.bias.data = child.bias.data.clone()
                setattr(owner, name, linear)
    return quantized


@pytest.mark.parametrize("keep", ["layers.0.mixer.in_proj", "layers.1.mixer.out_proj", "layers.0.mixer.ssm.x_proj"])
def test_one_quantized_product_is_simulated_to_float_precision(keep, tmp_path):
    quantized = mambaquant.quantize("mamba-shakespeare", method="rtn", w_bits=8, target="llama.cpp", calib_samples=2,
                                    calib_len=64)
    model = only_one_quantized(quantized, keep)
    path = export_gguf(model, tmp_path / "model.gguf")
    simulated = ours(model, TEXT[:200])
    assert relative(llama_logits(path, TEXT[:200]), simulated) < 1e-4
    for module in model.modules():  # without the input's quantization the simulation is measurably off
        if isinstance(module, QuantizedLinear):
            module.input_quantizer = None
    assert relative(llama_logits(path, TEXT[:200]), ours(model, TEXT[:200])) > 1e-4


def test_what_llama_cpp_cannot_run_is_refused_and_nothing_written(tmp_path):
    runtime = mambaquant.quantize("mamba-shakespeare", method="mambaquant", w_bits=8, calib_samples=2, calib_len=64)
    with pytest.raises(InputError, match="online op at site .*--target llama.cpp"):
        export_gguf(runtime, tmp_path / "a.gguf")
    with pytest.raises(InputError, match="llama.cpp cannot run this model: a VisionMamba"):
        export_gguf(mambaquant.load("vim-cifar10"), tmp_path / "b.gguf")
    with pytest.raises(InputError, match="a multiple of 32"):
        mambaquant.quantize("mamba-shakespeare", method="rtn", target="llama.cpp", weight_group_size=48)
    with pytest.raises(InputError, match="expected w_bits 8 or 4"):
        mambaquant.quantize("mamba-shakespeare", method="rtn", target="llama.cpp", w_bits=6)
    with pytest.raises(InputError, match="expected a_bits 8"):
        mambaquant.quantize("mamba-shakespeare", method="rtn", target="llama.cpp", a_bits=4)
    with pytest.raises(InputError, match="runs there .* expected --backend fake"):
        mambaquant.quantize("mamba-shakespeare", method="rtn", target="llama.cpp", backend="int8")
    export_gguf(mambaquant.load("mamba-shakespeare"), tmp_path / "c.gguf")
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        export_gguf(mambaquant.load("mamba-shakespeare"), tmp_path / "c.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf"]


def test_the_export_command(tmp_path):
    out = tmp_path / "q4"
    code, stdout, stderr = run_cli("quantize", "mamba2-shakespeare", "--method", "rtn", "--w-bits", "4", "--target",
                                   "llama.cpp", "--calib-samples", "2", "--calib-len", "64", "--no-eval", "--out",
                                   str(out), "--export", "gguf")
    assert code == 0, stderr
    assert (out / "model.gguf").is_file() and "target llama.cpp" in (out / "MODEL_CARD.md").read_text()
    code, stdout, stderr = run_cli("export", str(out), "--to", "gguf", "--out", str(tmp_path / "again.gguf"))
    assert code == 0, stderr
    assert (tmp_path / "again.gguf").read_bytes() == (out / "model.gguf").read_bytes()
    for args, message in [
        (("export", "mamba-shakespeare", "--to", "gguf", "--out", str(tmp_path / "fp.gguf")),
         "a full-precision model: pass --dtype f32"),
        (("export", str(out), "--to", "gguf", "--out", str(tmp_path / "again.gguf")), "exists; pass --overwrite"),
        (("export", "vim-cifar10", "--to", "gguf", "--dtype", "f32", "--out", str(tmp_path / "v.gguf")),
         "llama.cpp cannot run this model"),
        (("quantize", "mamba-shakespeare", "--target", "llama.cpp", "--weight-group-size", "16", "--no-eval"),
         "multiple of 32"),
    ]:
        code, stdout, stderr = run_cli(*args)
        assert code == 2 and message in stderr and "Traceback" not in stderr and len(stderr.splitlines()) == 1
    code, _, stderr = run_cli("export", "mamba-shakespeare", "--to", "gguf", "--dtype", "f32", "--out",
                              str(tmp_path / "fp.gguf"))
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.gguf", "fp.gguf", "q4"]


def test_streamed_quantization_for_llama_cpp_equals_the_in_memory_one(tmp_path):
    mambaquant.save(mambaquant.load("mamba2-shakespeare"), tmp_path / "fp")
    options = dict(method="mambaquant+", w_bits=4, target="llama.cpp", weight_group_size=32, calib_samples=2,
                   calib_len=64)
    streamed = mambaquant.load(mambaquant.quantize(tmp_path / "fp", out=tmp_path / "q", **options))
    in_memory = mambaquant.quantize("mamba2-shakespeare", **options)
    x = torch.tensor([TEXT[:100]])
    assert torch.equal(streamed(x), in_memory(x))
    exported = [export_gguf(model, tmp_path / f"{i}.gguf").read_bytes() for i, model in enumerate((streamed, in_memory))]
    assert exported[0] == exported[1]


def small_bpe_tokenizer(path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([bytes(TEXT).decode()] * 4, trainer)
    tokenizer.save(str(path))


def test_a_bpe_vocabulary_tokenizes_in_llama_cpp_as_in_ours(tmp_path):
    from mambaquant.tokenizer import BPETokenizer

    small_bpe_tokenizer(tmp_path / "tokenizer.json")
    ours_tokenizer = BPETokenizer(tmp_path / "tokenizer.json")
    model = random_mamba2(vocab_size=416)  # padded beyond the tokenizer's 400 entries, as real checkpoints are
    path = export_gguf(model, tmp_path / "model.gguf", tokenizer=tmp_path / "tokenizer.json")
    text = "ROMEO: What light through yonder window breaks?\n  It is the east, and Juliet is the sun!"
    with LlamaCppModel(path) as llm:
        assert llm.tokenize(text) == ours_tokenizer.encode(text)
        ids = ours_tokenizer.encode(text)
        assert relative(llm.logits(ids), ours(model, ids)) < 1e-4
    fields = gguf.GGUFReader(path).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"


def test_compare_for_llama_cpp_runs_one_row_per_method_and_width():
    from mambaquant.compare import compare, plan

    rows = compare("mamba-shakespeare", methods=("fp", "rtn"), bits=("w8a8", "w4a8"), eval_samples=2,
                   calib_samples=2, calib_len=64, target="llama.cpp")
    assert [(r.method, r.bits, r.granularity) for r in rows] == [("fp", "fp32", "none"), ("rtn", "w8a8", "block"),
                                                                 ("rtn", "w4a8", "block")]
    assert all(abs(row.value - rows[0].value) < 0.1 for row in rows) and rows[1].value != rows[2].value
    with pytest.raises(InputError, match="expected a_bits 8"):
        plan(("rtn",), ("w4a16",), ("tensor",), "llama.cpp")
