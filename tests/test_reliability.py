"""Reliability: bad input through the real CLI (exit 2, one line naming the problem and the expected form, no
traceback, nothing written), interruption, determinism, and property tests of the transforms on random shapes.
More bad inputs (missing path, no config, unsupported architecture, wrong shape, NaN weights, truncated or broken
checkpoints, an existing output directory) are tried in test_cli.py and test_quantized_checkpoint.py."""

import fcntl
import hashlib
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import mambaquant
from mambaquant.errors import InputError
from mambaquant.loaders import read_tensors
from mambaquant.methods import METHODS, QuantConfig, run_recipe
from mambaquant.runtime import LMConfig, MambaLM, VisionConfig, VisionMamba, init_weights
from mambaquant.transforms.klt import klt_hadamard
from mambaquant.transforms.rotation import random_hadamard

from .helpers import MAMBA1_METHODS, rel_err, run_cli


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    """A small byte-vocabulary LM saved in the Hugging Face layout."""
    config = LMConfig(d_model=64, n_layer=2, d_state=8, vocab_size=256, tie_embeddings=False)
    return mambaquant.save(init_weights(MambaLM(config), seed=3).eval(), tmp_path_factory.mktemp("lm") / "lm")


@pytest.fixture(scope="module")
def exploding_lm(saved_lm, tmp_path_factory):
    """Finite weights whose activations overflow: calibration produces Inf and NaN."""
    directory = tmp_path_factory.mktemp("exploding") / "lm"
    directory.mkdir()
    (directory / "config.json").write_text((saved_lm / "config.json").read_text())
    tensors = read_tensors(saved_lm / "model.safetensors")
    tensors["backbone.layers.0.mixer.in_proj.weight"] *= 1e37
    save_file(tensors, directory / "model.safetensors")
    return directory


@pytest.fixture(scope="module")
def no_hadamard_lm(tmp_path_factory):
    """d_inner 156: no Hadamard matrix of that order is constructed, and the online rotations need one."""
    config = LMConfig(d_model=78, n_layer=1, d_state=8, vocab_size=256, tie_embeddings=False)
    return mambaquant.save(init_weights(MambaLM(config), seed=4).eval(), tmp_path_factory.mktemp("lm156") / "lm")


@pytest.fixture(scope="module")
def empty_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "empty.txt"
    path.write_text("")
    return path


BAD_QUANTIZE = {  # case -> (arguments after `quantize SOURCE`, expected words in the message)
    "weight bits 0": (["--w-bits", "0"], "bit width 0 is not supported; expected 2 to 8"),
    "activation bits 1": (["--a-bits", "1"], "bit width 1 is not supported; expected 2 to 8"),
    "weight bits 9": (["--w-bits", "9"], "bit width 9 is not supported; expected 2 to 8"),
    "bits as a word": (["--w-bits", "eight"], "expected a bit width from 2 to 8"),
    "unknown method": (["--method", "awq"], "invalid choice: 'awq'"),
    "calibration samples 0": (["--calib-samples", "0"], "expected a positive integer"),
    "unknown calibration set": (["--calib", "imagenet"], "unknown calibration set 'imagenet'; expected one of"),
    "calibration longer than the text": (["--calib-len", "1000000"], "expected --calib-len below"),
}


@pytest.mark.parametrize("case", BAD_QUANTIZE)
def test_bad_quantize_options_exit_2_with_one_line(case, saved_lm, tmp_path):
    args, expected = BAD_QUANTIZE[case]
    out = tmp_path / "out"
    code, _, err = run_cli("quantize", saved_lm, "--calib", "shakespeare-train", *args, "--out", out)
    assert code == 2 and expected in err, (case, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (case, err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_method_lists_the_valid_ones(saved_lm):
    _, _, err = run_cli("quantize", saved_lm, "--method", "awq")
    assert all(method in err for method in METHODS)
    _, _, err = run_cli("compare", saved_lm, "--methods", "rtn,awq")
    assert "unknown method 'awq'; expected some of" in err and "mambaquant" in err
    code, _, err = run_cli("compare", saved_lm, "--bits", "w9a8")
    assert code == 2 and "unknown bit widths 'w9a8'; expected some of w8a8, w6a6, w4a8, w4a4, w4a16" in err


@pytest.mark.parametrize("method", ["rtn", "mambaquant"])
def test_calibration_producing_nan_or_inf_exits_2(method, exploding_lm, tmp_path):
    code, _, err = run_cli("quantize", exploding_lm, "--method", method, "--calib", "shakespeare-train",
                           "--calib-samples", "2", "--out", tmp_path / "out")
    assert code == 2 and "calibration produced NaN or Inf" in err and "expected finite activations" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_empty_calibration_file_exits_2(saved_lm, empty_text):
    code, _, err = run_cli("quantize", saved_lm, "--calib", empty_text, "--no-eval")
    assert code == 2 and "the calibration text is empty; expected training text" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["quarot", "quamba", "mambaquant"])
def test_hadamard_size_without_construction_exits_2(method, no_hadamard_lm):
    code, _, err = run_cli("quantize", no_hadamard_lm, "--method", method, "--calib", "shakespeare-train",
                           "--calib-samples", "2", "--no-eval")
    assert code == 2 and "no Hadamard construction for size 156" in err and "supported sizes are" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_image_of_the_wrong_size_is_refused(small_vim):
    with pytest.raises(InputError, match=r"expected \(3, 32, 32\)"):
        small_vim(torch.zeros(1, 3, 64, 64))


def interrupt_quantize(out, after_progress: float) -> tuple[int, str]:
    """Start `quantize ... --out` with stderr on a terminal (so it draws its progress bar), wait for the bar (work
    under way), let it run `after_progress` seconds more, then send SIGINT as Ctrl-C does. (exit code, stderr)."""
    terminal, child_end = pty.openpty()
    fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    proc = subprocess.Popen([sys.executable, "-m", "mambaquant", "quantize", "mamba-shakespeare", "--method", "gptq",
                             "--w-bits", "4", "--calib-samples", "64", "--no-eval", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=child_end)
    os.close(child_end)
    err = b""
    while b"block/s" not in err:
        err += os.read(terminal, 4096)
    time.sleep(after_progress)
    proc.send_signal(signal.SIGINT)
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    os.close(terminal)
    return proc.wait(timeout=120), err.decode()


@pytest.mark.parametrize("after", [0.0, 1.0])
def test_interrupting_quantize_leaves_nothing_half_written(after, tmp_path):
    out = tmp_path / "q"
    code, err = interrupt_quantize(out, after)
    assert "Traceback" not in err
    if code == 0:  # finished before the signal: then the output is complete and loads
        mambaquant.load(out)
    else:
        assert code == 130 and err.strip().endswith("mambaquant: interrupted"), err
        assert list(tmp_path.iterdir()) == []  # no output directory, no staging directory


def file_hashes(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_command_same_seed_gives_a_bit_identical_checkpoint(tmp_path):
    runs = []
    for name in ("a", "b"):
        code, stdout, err = run_cli("quantize", "mamba-shakespeare", "--method", "mambaquant", "--w-bits", "4",
                                    "--calib-samples", "8", "--eval-samples", "8", "--seed", "7", "--json",
                                    "--out", tmp_path / name)
        assert code == 0, err
        runs.append((file_hashes(tmp_path / name), json.loads(stdout)["value"]))
    assert runs[0] == runs[1]
    assert set(runs[0][0]) == {"config.json", "model.safetensors", "MODEL_CARD.md", ".mambaquant-output.json"}


# ---------------------------------------------------------------------------------------------------------------
# Properties on random shapes and seeds
# ---------------------------------------------------------------------------------------------------------------

ORDERS = st.sampled_from([1, 2, 3, 5, 8, 12, 16, 20, 24, 28, 40, 48, 64, 72, 96, 100])


@settings(max_examples=40, deadline=None)
@given(n=ORDERS, seed=st.integers(0, 2**16))
def test_randomised_hadamard_is_orthogonal(n, seed):
    R = random_hadamard(n, seed).double()
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=ORDERS, rank=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_klt_hadamard_is_orthogonal_and_equalises_variances(n, rank, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64) * 10
    covariance = x.T @ x / rank
    R = klt_hadamard(covariance).double()
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
    variances = torch.diagonal(R.T @ covariance @ R)
    if n in (1, 2, 8, 12, 16, 20, 24, 28, 40, 48, 64, 72, 96):  # orders with a Hadamard matrix: all equal, up to
        assert torch.allclose(variances, variances.mean().expand(n), rtol=1e-4, atol=1e-9)  # R's float32 rounding


def perturbed(model, seed):
    """Non-unit norm scales and non-trivial D and biases, as in trained models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(MAMBA1_METHODS[1:]), vision=st.booleans(),
       d_model=st.sampled_from([16, 24, 32, 40, 48]), d_state=st.sampled_from([4, 6, 8, 16]),
       n_layer=st.integers(1, 2), tied=st.booleans(), seed=st.integers(0, 2**16))
def test_every_recipe_keeps_the_function_on_random_shapes(method, vision, d_model, d_state, n_layer, tied, seed):
    """16 bits quantize nothing: what is left are the method's transforms, which must keep the model's function on
    fresh inputs, whatever the shapes (state sizes without a Hadamard matrix included) and seeds."""
    g = torch.Generator().manual_seed(seed)
    if vision:
        config = VisionConfig(d_model=d_model, n_layer=n_layer, d_state=d_state, img_size=16, patch_size=4, stride=4,
                              num_classes=5)
        model = perturbed(init_weights(VisionMamba(config), seed=seed), seed).eval()
        calib, fresh = torch.randn(4, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
    else:
        config = LMConfig(d_model=d_model, n_layer=n_layer, d_state=d_state, vocab_size=64, tie_embeddings=tied)
        model = perturbed(init_weights(MambaLM(config), seed=seed), seed).eval()
        calib, fresh = torch.randint(0, 64, (4, 24), generator=g), torch.randint(0, 64, (3, 30), generator=g)
    transformed, _ = run_recipe(model, QuantConfig(method=method, w_bits=16, a_bits=16, seed=seed), [calib])
    with torch.no_grad():
        assert rel_err(transformed(fresh), model(fresh)) < 1e-4
