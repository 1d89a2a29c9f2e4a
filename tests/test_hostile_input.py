"""Hostile input, round 3 (issue 38): each class has one mechanism, tried here on more than the cases that found it.

- task files are code: a task YAML that would import Python runs only with --trust-task-code; user tasks never
  shadow shipped ones; YAML is read with size, alias and include limits;
- every file is checked before it is read: kinds (FIFOs, directories), bounded walks, sizes against memory, text
  before a tokenizer;
- a user data file replaces ours or the run stops, and the protocol names the file evaluated;
- one error type at the Python API boundary.
(The int8 backend at degenerate widths is in test_integer_kernels.py; analyze on a quantized checkpoint in
test_analyze.py.)
"""

import json
import os

import numpy as np
import pytest
import torch

import mambaquant
from mambaquant import inputs
from mambaquant.errors import InputError
from mambaquant.evaluation.local_tasks import LMEvalConfig, load_tasks
from mambaquant.evaluation.user_data import user_data
from mambaquant.runtime import LMConfig, MambaLM, init_weights

from .cli_cases import assert_refused

MC_TASK = ("task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: docs.jsonl\ntest_split: test\n"
           "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n")
DOCS = [{"context": "To be, or not to b", "choices": ["e", "x"], "label": 0},
        {"context": "Now is the winter of our disconten", "choices": ["q", "t"], "label": 1}]


def write_task(folder, name="mine", extra="", docs=DOCS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(MC_TASK.format(name=name) + extra)
    return folder / f"{name}.yaml"


def write_code(folder, marker):
    (folder / "utils.py").write_text(f"def process(dataset):\n    open({str(marker)!r}, 'w').close()\n"
                                     "    return dataset\n")


# --- task files are code ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["direct", "include folder", "included file"])
def test_a_task_that_imports_code_needs_consent_and_runs_nothing_without_it(tmp_path, how):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "tasks"
    if how == "included file":  # the code is in a base YAML the task includes
        write_task(folder, "base", "process_docs: !function utils.process\n")
        (folder / "base.yaml").rename(folder / "base.yml")  # not indexed itself: only reached through the include
        yaml = write_task(folder, "mine", "include: base.yml\n")
    else:
        yaml = write_task(folder, "mine", "process_docs: !function utils.process\n")
    write_code(folder, marker)
    tasks, include = (str(yaml), ()) if how == "direct" else ("mine", (str(folder),))
    with pytest.raises(InputError, match=r"runs Python code \(!function utils.process .*--trust-task-code"):
        load_tasks(tasks, include=include)
    assert not marker.exists()
    loaded, origins = load_tasks(tasks, include=include, trust_code=True)
    assert marker.exists() and list(loaded) == ["mine"] and "docs.jsonl" in origins["mine"]


def test_the_shipped_task_runs_its_own_code_without_consent():
    loaded, origins = load_tasks("shakespeare_mc")
    assert len(loaded["shakespeare_mc"].eval_docs) == 200 and origins["shakespeare_mc"].startswith("shipped")


def test_user_tasks_never_shadow_a_shipped_task_and_are_defined_once(tmp_path):
    write_task(tmp_path / "a", "shakespeare_mc")
    with pytest.raises(InputError, match="defines task 'shakespeare_mc', which mambaquant ships"):
        load_tasks("shakespeare_mc", include=(str(tmp_path / "a"),))
    write_task(tmp_path / "b", "twice")
    write_task(tmp_path / "c", "twice")
    with pytest.raises(InputError, match="defines 'twice', which .* defines too"):
        load_tasks("twice", include=(str(tmp_path / "b"), str(tmp_path / "c")))


def test_yaml_is_read_with_size_alias_and_include_limits(tmp_path):
    bomb = "task: bomb\na0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 40))
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(InputError, match="351 YAML aliases; expected at most 256"):
        load_tasks(str(tmp_path / "bomb.yaml"))
    (tmp_path / "big.yaml").write_text("task: big\n" + "# padding\n" * 120_000)
    with pytest.raises(InputError, match="big.yaml: 1,200,010 bytes; expected an lm-eval task YAML of at most"):
        load_tasks(str(tmp_path / "big.yaml"))
    (tmp_path / "loop.yaml").write_text("task: loop\ninclude: loop.yaml\n")
    with pytest.raises(InputError, match="includes itself"):
        load_tasks(str(tmp_path / "loop.yaml"))
    (tmp_path / "tag.yaml").write_text("task: tagged\n!!python/object/apply:os.system ['true']: x\n")
    with pytest.raises(InputError, match="not a readable lm-eval task YAML"):
        load_tasks(str(tmp_path / "tag.yaml"))


# --- every file checked before it is read -----------------------------------------------------------------------

def test_fifos_are_refused_by_kind_never_waited_on(tmp_path, cli):
    os.mkfifo(tmp_path / "pipe.yaml")
    assert_refused(cli.run("eval", "mamba-shakespeare", "--lm-eval", "shakespeare_mc", "--lm-eval-include", tmp_path,
                           timeout=60), "pipe.yaml: is a FIFO")
    assert_refused(cli.run("eval", "mamba-shakespeare", "--lm-eval", str(tmp_path / "pipe.yaml"), timeout=60),
                   "is a FIFO")
    assert_refused(cli.run("quantize", "mamba-shakespeare", "--calib", tmp_path / "pipe.yaml", "--no-eval",
                           "--out", tmp_path / "out", timeout=60), "pipe.yaml: is a FIFO")
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    os.mkfifo(images / "cat" / "0.png")
    assert_refused(cli.run("eval", "vim-cifar10", "--eval-data", images, timeout=60), "0.png: is a FIFO")
    assert not (tmp_path / "out").exists()


def test_walks_are_bounded_and_stay_off_the_filesystem_root(tmp_path, monkeypatch, cli):
    assert_refused(cli.run("eval", "mamba-shakespeare", "--lm-eval", "shakespeare_mc", "--lm-eval-include", "/",
                           timeout=60), "the filesystem root")
    for i in range(30):
        (tmp_path / f"f{i}.txt").touch()
    os.symlink(tmp_path, tmp_path / "loop")  # a link back to its own folder is visited once
    assert len(inputs.walk(tmp_path, "a folder", (".txt",), "a file")) == 30
    with pytest.raises(InputError, match="more than 20 files and folders"):
        inputs.walk(tmp_path, "a folder", (".txt",), "a file", max_entries=20)


def test_sizes_are_checked_against_memory_before_anything_is_allocated(tmp_path, monkeypatch, cli):
    from PIL import Image

    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(images / "0.png")
    monkeypatch.setattr("mambaquant.memory.available_bytes", lambda: 10_000)  # the decoded images would not fit
    with pytest.raises(InputError, match=r"1 images of 32x32 pixels .* needs"):
        user_data(str(tmp_path / "images"))
    monkeypatch.undo()
    with pytest.raises(InputError, match="a MambaLM of .* parameters needs .* expected a smaller config"):
        mambaquant.build(LMConfig(d_model=16384, n_layer=256, vocab_size=256))
    np.save(tmp_path / "long.npy", np.zeros((1, 1_500_000), dtype=np.int64))  # 12 MB of tokens, GBs of activations
    assert_refused(cli.run("quantize", "mamba-shakespeare", "--calib", tmp_path / "long.npy", "--method", "rtn",
                           "--no-eval", "--out", tmp_path / "out", timeout=120),
                   "1 calibration samples of 1,500,000 positions need", "--calib-len")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_is_fed_only_text(tmp_path):
    from mambaquant.calibration import calibration_inputs
    from mambaquant.evaluation.text import lambada_passages, wikitext2_test_text
    from mambaquant.tokenizer import ByteTokenizer

    (tmp_path / "zeros.raw").write_bytes(bytes(4096))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 400)
    with pytest.raises(InputError, match="a NUL byte at offset 0: binary data, not text"):
        wikitext2_test_text(tmp_path / "zeros.raw")
    with pytest.raises(InputError, match="a NUL byte"):
        lambada_passages(tmp_path / "zeros.raw")
    with pytest.raises(InputError, match=r"not UTF-8 text \(byte 3\)"):
        calibration_inputs(str(tmp_path / "latin1.txt"), 2, 16, tokenizer=ByteTokenizer())
    # a byte-level model reads bytes as they are: any file is its text
    assert calibration_inputs(str(tmp_path / "zeros.raw"), 2, 16).shape == (2, 16)


# --- a user data file replaces ours or the run stops -----------------------------------------------------------

BAD_DATA = {
    "missing": (None, "no such file; expected a task data file"),
    "empty": ("", "empty; expected the task's documents"),
    "not json": ("not json\n", "line 1 is not JSON"),
    "not objects": ("[1, 2]\n", "document 0 is not a JSON object"),
    "wrong fields": (json.dumps({"text": "a", "options": ["b"], "answer": 0}) + "\n",
                     r"document 0 has no field 'context' \(doc_to_text\)"),
    "label outside": (json.dumps({"context": "a", "choices": ["b", "c"], "label": 2}) + "\n",
                      "document 0's label 2 is not one of its 2 choices"),
    "binary": ("\0" * 64, "a NUL byte"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_user_data_stops_the_run(case, tmp_path):
    content, message = BAD_DATA[case]
    file = tmp_path / "data.jsonl"
    if content is not None:
        file.write_text(content)
    with pytest.raises(InputError, match=message):
        load_tasks("shakespeare_mc", data={"shakespeare_mc": str(file)})


def test_user_data_replaces_the_shipped_data_and_the_protocol_names_it(tmp_path, cli):
    file = tmp_path / "mine.jsonl"
    file.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    loaded, origins = load_tasks("shakespeare_mc", data={"shakespeare_mc": str(file)})
    assert len(loaded["shakespeare_mc"].eval_docs) == 2 and origins["shakespeare_mc"] == f"user data: {file}"
    result = cli.run("eval", "mamba-shakespeare", "--lm-eval", "shakespeare_mc", "--lm-eval-data",
                     f"shakespeare_mc={file}", "--json", timeout=300)
    assert result.code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["samples"] == 2 and f"user data: {file}" in row["protocol"]
    assert_refused(cli.run("eval", "mamba-shakespeare", "--lm-eval", "shakespeare_mc", "--lm-eval-data",
                           f"shakespeare_mc={tmp_path / 'none.jsonl'}", timeout=60), "none.jsonl: no such file")


def test_a_yaml_field_the_documents_lack_is_refused_not_read_as_a_template(tmp_path):
    yaml = write_task(tmp_path, "mine", docs=[{"prompt": "a", "choices": ["b", "c"], "label": 0}])
    with pytest.raises(InputError, match="doc_to_text reads field 'context', which its documents do not have"):
        load_tasks(str(yaml))


# --- one error type at the Python API boundary -----------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return init_weights(MambaLM(LMConfig(d_model=32, n_layer=1, d_state=4, vocab_size=256)), seed=1).eval()


def api_cases(model, tmp_path):
    from mambaquant.analysis import analyze
    from mambaquant.compare import compare
    from mambaquant.evaluation import evaluate, lm_eval
    from mambaquant.exporters.gguf import export_gguf

    state = model.state_dict()
    name = "layers.0.mixer.in_proj.weight"
    return {
        "build: seed of the wrong type": (lambda: mambaquant.build(LMConfig(d_model=32, n_layer=1), seed="1"),
                                          "the seed must be an integer"),
        "build: a bool seed": (lambda: mambaquant.build(LMConfig(d_model=32, n_layer=1), seed=True), "seed"),
        "load: an unknown option": (lambda: mambaquant.load("mamba-shakespeare", heads=2), "unknown option heads to load"),
        "load: n_groups for a model with its config": (lambda: mambaquant.load("mamba-shakespeare", n_groups=2),
                                                       "n_groups: options complete a bare checkpoint file"),
        "load_state_dict: a meta tensor": (lambda: mambaquant.load_state_dict(
            model, {**state, name: torch.empty(state[name].shape, device="meta")}), "is a meta tensor"),
        "load_state_dict: a sparse tensor": (lambda: mambaquant.load_state_dict(
            model, {**state, name: state[name].to_sparse()}), "sparse_coo tensor"),
        "quantize: an unknown option": (lambda: mambaquant.quantize(model, method="rtn", group_size=32),
                                        "unknown quantize option group_size"),
        "evaluate: max_samples of the wrong type": (lambda: evaluate(model, "m", max_samples="3"),
                                                    "max_samples must be a positive integer"),
        "lm_eval: tasks of the wrong type": (lambda: lm_eval(model, 5), "lm-eval tasks must be"),
        "lm_eval: trust_code of the wrong type": (lambda: LMEvalConfig("shakespeare_mc", trust_code="yes"),
                                                  "trust_code must be True or False"),
        "compare: methods of the wrong type": (lambda: compare(model, methods=5), "methods must be a list"),
        "analyze: an output path of the wrong type": (lambda: analyze(model, 5), "the output directory is 5"),
        "analyze: an unknown option": (lambda: analyze(model, tmp_path / "a", samples=3),
                                       "unknown analyze option samples"),
        "export: an output path of the wrong type": (lambda: export_gguf(model, 5), "the output file name is 5"),
        "save: an output path of the wrong type": (lambda: mambaquant.save(model, None), "the output directory"),
    }


def test_every_api_entry_point_raises_input_error_in_one_line(model, tmp_path):
    for case, (call, message) in api_cases(model, tmp_path).items():
        with pytest.raises(InputError, match=message) as raised:
            call()
        assert "\n" not in str(raised.value), case
    assert not any(tmp_path.iterdir())


def test_load_options_apply_only_to_the_files_they_complete(tmp_path):
    model = init_weights(MambaLM(LMConfig(d_model=32, n_layer=1, d_state=4, vocab_size=256)), seed=1).eval()
    directory = mambaquant.save(model, tmp_path / "saved")
    with pytest.raises(InputError, match="a model directory records its config"):
        mambaquant.load(directory, n_groups=2)
    with pytest.raises(InputError, match="a MambaLM records its config"):
        mambaquant.load(model, img_size=32)
    (weights,) = directory.glob("*.safetensors")  # a bare Mamba-1 state dict
    with pytest.raises(InputError, match="n_groups apply only to a Mamba-2 checkpoint file, and this is not one"):
        mambaquant.load(weights, n_groups=2)
    assert torch.equal(mambaquant.load(weights).lm_head.weight, model.lm_head.weight)
