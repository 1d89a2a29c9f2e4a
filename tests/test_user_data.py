"""Your own data everywhere: calibration inputs and labelled evaluation sets from tensors, Datasets, iterables, files
(.pt, .npz, .safetensors) and ImageFolder-style directories, through the API and the CLI, and the one-line refusals."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import mambaquant
from mambaquant.calibration import resolve_calibration
from mambaquant.compare import USER_TASK, compare
from mambaquant.data import normalise_images
from mambaquant.errors import InputError
from mambaquant.evaluation import evaluate
from mambaquant.runtime import LMConfig, MambaLM, MambaTagger, TaggerConfig, VisionConfig, VisionMamba, init_weights

from .cli_cases import assert_refused

G = torch.Generator().manual_seed(0)
IMAGES = torch.randn(12, 3, 16, 16, generator=G)
CLASSES = torch.randint(0, 10, (12,), generator=G)
TOKENS = torch.randint(0, 256, (6, 20), generator=G)
TAGS = torch.randint(0, 5, (6, 20), generator=G)


@pytest.fixture(scope="module")
def vim():
    config = VisionConfig(img_size=16, patch_size=4, stride=4, d_model=32, n_layer=2, d_state=8, num_classes=10,
                          in_chans=3)
    return init_weights(VisionMamba(config), seed=3).eval()


@pytest.fixture(scope="module")
def tagger():
    return init_weights(MambaTagger(TaggerConfig(d_model=32, n_layer=2, d_state=8, vocab_size=256, num_classes=5)),
                        seed=4).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every file kind, holding IMAGES (and CLASSES)."""
    root = tmp_path_factory.mktemp("files")
    np.savez(root / "labelled.npz", inputs=IMAGES.numpy(), labels=CLASSES.numpy())
    np.savez(root / "only.npz", pixels=IMAGES.numpy())
    torch.save({"inputs": IMAGES, "labels": CLASSES}, root / "labelled.pt")
    torch.save(IMAGES, root / "tensor.pt")
    save_file({"inputs": IMAGES, "labels": CLASSES}, root / "labelled.safetensors")
    save_file({"x": IMAGES}, root / "only.safetensors")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder: 3 classes of 16x16 RGB PNGs; returns (root, uint8 images in class order, labels)."""
    root = tmp_path_factory.mktemp("folder")
    pixels = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    for i, name in enumerate(["cat", "ant", "bee", "cat", "ant", "bee"]):
        (root / name).mkdir(exist_ok=True)
        Image.fromarray(pixels[i]).save(root / name / f"{i}.png")
    order = [1, 4, 2, 5, 0, 3]  # ant (0), bee (1), cat (2), files sorted by name within a class
    return root, pixels[order], torch.tensor([0, 0, 1, 1, 2, 2])


def top1(model, inputs, labels) -> float:
    with torch.no_grad():
        return 100.0 * (model(inputs).argmax(-1) == labels).float().mean().item()


# --- calibration --------------------------------------------------------------------------------------------------

def test_every_calibration_kind_gives_the_same_inputs(vim, files):
    kinds = {"tensor": IMAGES, "pair": (IMAGES, CLASSES), "dataset": TensorDataset(IMAGES, CLASSES),
             "pairs": list(zip(IMAGES, CLASSES)), "generator": (x for x in IMAGES),
             "loader": DataLoader(TensorDataset(IMAGES, CLASSES), batch_size=5)}
    kinds.update({name: str(files / name) for name in ("labelled.npz", "only.npz", "labelled.pt", "tensor.pt",
                                                       "labelled.safetensors", "only.safetensors")})
    for kind, calib in kinds.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = resolve_calibration(vim, "vim", calib, samples=7, batch_size=4)
        assert torch.equal(torch.cat(batches), IMAGES[:7]), kind
        assert [len(b) for b in batches] == [4, 3]
        described = calib if isinstance(calib, str) else f"a {type(calib).__name__}"
        assert [str(w.message) for w in caught] == [f"calibration takes the first 7 inputs of {described} "
                                                    "(calib_samples, --calib-samples)"], kind


def test_calibration_of_all_inputs_says_nothing(vim, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(torch.cat(resolve_calibration(vim, "vim", IMAGES, samples=12))) == 12
        root, pixels, _ = folder
        assert torch.equal(torch.cat(resolve_calibration(vim, "vim", str(root), samples=6)), normalise_images(pixels))


def test_quantize_calibrates_on_a_dataset(tagger):
    quantized = mambaquant.quantize(tagger, method="rtn", calib=TensorDataset(TOKENS, TAGS), calib_samples=6)
    reference = mambaquant.quantize(tagger, method="rtn", calib=TOKENS)
    with torch.no_grad():
        assert torch.equal(quantized(TOKENS), reference(TOKENS))


# --- evaluation ---------------------------------------------------------------------------------------------------

def test_every_labelled_kind_gives_the_same_top1(vim, files):
    expected = top1(vim, IMAGES, CLASSES)
    kinds = {"pair": (IMAGES, CLASSES), "dataset": TensorDataset(IMAGES, CLASSES), "pairs": list(zip(IMAGES, CLASSES)),
             "loader": DataLoader(TensorDataset(IMAGES, CLASSES), batch_size=5), "npz": files / "labelled.npz",
             "pt": str(files / "labelled.pt"), "safetensors": str(files / "labelled.safetensors")}
    for kind, data in kinds.items():
        result = evaluate(vim, "vim", eval_data=data)
        assert (result.metric, result.value, result.samples) == ("top1", expected, 12), kind
        assert result.protocol.startswith("user data: 12 labelled inputs from ") and result.agreement is None
    result = evaluate(vim, "vim", max_samples=5, reference=vim, eval_data=str(files / "labelled.npz"))
    assert result.value == top1(vim, IMAGES[:5], CLASSES[:5]) and result.agreement == 100.0
    assert result.protocol == f"user data: the first 5 labelled inputs from {files / 'labelled.npz'}, top-1 %"


def test_image_folder(vim, folder):
    root, pixels, labels = folder
    result = evaluate(vim, "vim", eval_data=root)
    assert result.value == top1(vim, normalise_images(pixels), labels) and result.samples == 6
    assert result.protocol == f"user data: 6 labelled inputs from {root} (3 classes), top-1 %"


def test_per_token_labels_and_agreement(tagger):
    quantized = mambaquant.quantize(tagger, method="rtn", w_bits=4, calib=TOKENS)
    result = evaluate(quantized, "tagger", reference=tagger, eval_data=(TOKENS, TAGS))
    with torch.no_grad():
        agreement = 100.0 * (quantized(TOKENS).argmax(-1) == tagger(TOKENS).argmax(-1)).float().mean().item()
    assert result.value == top1(quantized, TOKENS, TAGS) and result.agreement == agreement
    assert result.protocol == "user data: 6 labelled inputs from a tuple (120 tokens), per-token top-1 %"
    lm = init_weights(MambaLM(LMConfig(d_model=16, n_layer=1, d_state=4, vocab_size=256, tie_embeddings=False)), 1)
    next_tokens = torch.roll(TOKENS, -1, dims=1)
    assert evaluate(lm.eval(), "lm", eval_data=(TOKENS, next_tokens)).value == top1(lm, TOKENS, next_tokens)


def test_compare_on_user_data_never_calibrates_on_it(vim, files):
    data = files / "labelled.npz"
    with pytest.raises(InputError, match="no default calibration set"):  # a 16x16 model has no default set
        compare(vim, methods=("fp", "rtn"), bits=("w8a8",), granularities=("tensor",), eval_data=data)
    rows = compare(vim, methods=("fp", "rtn"), bits=("w8a8",), granularities=("tensor",), calib=IMAGES[:4],
                   eval_data=data, eval_samples=8)
    assert [(row.method, row.task, row.samples) for row in rows] == [("fp", USER_TASK, 8), ("rtn", USER_TASK, 8)]
    assert rows[0].value == rows[0].fp_value == top1(vim, IMAGES[:8], CLASSES[:8])
    assert rows[0].agreement is None and 0 <= rows[1].agreement <= 100
    assert rows[1].protocol == f"user data: the first 8 labelled inputs from {data}, top-1 %"


# --- refusals -------------------------------------------------------------------------------------------------------

def bad_files(root):
    """name -> (path, words of the refusal), each written under root."""
    np.savez(root / "unlabelled.npz", inputs=IMAGES.numpy())
    np.savez(root / "noinputs.npz", a=IMAGES.numpy(), b=CLASSES.numpy())
    np.savez(root / "range.npz", inputs=IMAGES.numpy(), labels=CLASSES.numpy() + 10)
    np.savez(root / "short.npz", inputs=IMAGES.numpy(), labels=CLASSES.numpy()[:5])
    np.savez(root / "text.npz", inputs=np.array(["a", "b"]), labels=np.array([0, 1]))
    np.savez(root / "floatlabels.npz", inputs=IMAGES.numpy(), labels=CLASSES.numpy() + 0.5)
    np.savez(root / "big.npz", inputs=torch.randn(2, 3, 32, 32).numpy(), labels=np.array([0, 1]))
    (root / "garbage.npz").write_bytes(b"not a zip")
    (root / "data.csv").write_text("1,2\n")
    (root / "empty").mkdir()
    (root / "noimages" / "cat").mkdir(parents=True)
    (root / "noimages" / "cat" / "notes.txt").write_text("hi")
    (root / "broken" / "cat").mkdir(parents=True)
    (root / "broken" / "cat" / "0.png").write_bytes(b"\x89PNG not really")
    (root / "mixed" / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / "mixed" / "a" / "0.png")
    Image.new("RGB", (8, 16)).save(root / "mixed" / "a" / "1.png")
    return {
        "missing file": ("no/such.npz", "no such file; expected a .npz file of inputs"),
        "unknown extension": ("data.csv", "unknown file type"),
        "no labels": ("unlabelled.npz", "no labels"),
        "no inputs": ("noinputs.npz", "no 'inputs' among a, b"),
        "labels out of range": ("range.npz", "labels must lie in 0..9 (the model's 10 classes); got 10.."),
        "length mismatch": ("short.npz", "12 inputs and 5 labels"),
        "non-numeric": ("text.npz", "non-numeric array"),
        "float labels": ("floatlabels.npz", "labels must be integer class indices"),
        "image size": ("big.npz", "(3, 32, 32)"),
        "not a zip": ("garbage.npz", "not a readable .npz file"),
        "no class folders": ("empty", "no class subdirectories"),
        "no images": ("noimages", "no images"),
        "undecodable image": ("broken", "0.png: not a readable image"),
        "images of two sizes": ("mixed", "expected images of one size"),
    }


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, bad_files(root)


def test_bad_data_is_one_clear_error(vim, bad):
    root, cases = bad
    for case, (name, words) in cases.items():
        with pytest.raises(InputError) as error:
            evaluate(vim, "vim", eval_data=root / name)
        assert words in str(error.value), case
    with pytest.raises(InputError, match=r"shape \(6, 20\) \(one per token\)"):
        evaluate(init_weights(MambaTagger(TaggerConfig(d_model=16, n_layer=1, vocab_size=256, num_classes=5)), 1),
                 "tagger", eval_data=(TOKENS, TAGS[:, 0]))
    for calib, words in [("no/such.pt", "no such file"), (str(root / "noinputs.npz"), "no 'inputs'"),
                         ([1, 2], "calib must be a tensor"), ([], "is empty"), (object(), "calib must be a tensor"),
                         ([IMAGES[0], IMAGES[0, :, :8]], "inputs of different shapes")]:
        with pytest.raises(InputError, match=words):
            resolve_calibration(vim, "vim", calib)
    with pytest.raises(InputError, match="task 'cifar10' and eval_data"):
        evaluate(vim, "vim", task="cifar10", eval_data=(IMAGES, CLASSES))


# --- the command line -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vim_dir(vim, tmp_path_factory):
    return mambaquant.save(vim, tmp_path_factory.mktemp("vim") / "vim")


def test_cli_eval_quantize_compare_on_user_data(cli, vim, vim_dir, files, tmp_path):
    data, calib = files / "labelled.npz", files / "tensor.pt"
    result = cli.run("eval", vim_dir, "--eval-data", data, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["value"] == top1(vim, IMAGES, CLASSES)
    result = cli.run("quantize", vim_dir, "--method", "rtn", "--calib", calib, "--calib-samples", "4",
                     "--eval-data", data)
    assert result.code == 0, result.stderr
    assert f"user data: 12 labelled inputs from {data}, top-1 %" in result.stdout
    assert "agreement with FP" in result.stdout and "calibration takes the first 4 inputs" in result.stderr
    result = cli.run("compare", vim_dir, "--methods", "fp,rtn", "--bits", "w8a8", "--granularity", "tensor",
                     "--calib", files / "only.safetensors", "--eval-data", data, "--json", tmp_path / "rows.json")
    assert result.code == 0, result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(row["method"], row["task"]) for row in rows] == [("fp", USER_TASK), ("rtn", USER_TASK)]


def test_cli_refuses_bad_data_with_one_line(cli, vim_dir, files, bad, tmp_path):
    root, cases = bad
    for case in ("missing file", "unknown extension", "labels out of range", "undecodable image", "no inputs"):
        name, words = cases[case]
        assert_refused(cli.run("eval", vim_dir, "--eval-data", root / name, cwd=root), words)
    data = files / "labelled.npz"
    assert_refused(cli.run("quantize", vim_dir, "--eval-data", data, cwd=tmp_path), "no default calibration set")
    assert_refused(cli.run("quantize", vim_dir, "--calib", root / "noinputs.npz", "--no-eval", cwd=tmp_path),
                   "no 'inputs'")
    assert_refused(cli.run("quantize", vim_dir, "--eval-data", data, "--no-eval", cwd=tmp_path), "--no-eval")
    assert_refused(cli.run("eval", vim_dir, "--eval-data", data, "--task", "cifar10", cwd=tmp_path), "--task")
    assert_refused(cli.run("compare", vim_dir, "--eval-data", root / "empty", cwd=tmp_path), "no class subdirectories")
