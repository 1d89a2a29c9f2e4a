"""Bad input through the real CLI, and the promise that nothing the user did not create is ever deleted.

Each command runs in a real process of its own (the `cli` fixture, tests/cli_server.py), and a refusal must be exit 2,
one line on stderr naming the problem, no traceback, bounded memory, nothing touched on disk. Checkpoint and config
attacks are in test_bad_checkpoints.py and test_checkpoint_integrity.py; this module covers the options, the output
paths (overwrite safety, report files, atomicity under signals), calibration and generation inputs, and progress.
"""

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import mambaquant
from mambaquant.errors import InputError
from mambaquant.outputs import MANIFEST
from mambaquant.runtime import LMConfig, MambaLM, VisionConfig, VisionMamba, init_weights

from .cli_cases import ROOT, assert_failed_after_progress, assert_refused

FAST = ["--no-eval", "--calib-samples", "2", "--calib-len", "32", "--method", "rtn"]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (hidden ones too) with its content."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def staging_left(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".mambaquant-staging-" in p.name or ".mambaquant-old-" in p.name]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A byte-level LM saved by mambaquant (so it carries the manifest of a directory this tool wrote)."""
    config = LMConfig(d_model=32, n_layer=2, d_state=8, vocab_size=256, tie_embeddings=False)
    return mambaquant.save(init_weights(MambaLM(config), seed=5).eval(), tmp_path_factory.mktemp("src") / "lm")


@pytest.fixture(scope="module")
def vim_dir(tmp_path_factory) -> Path:
    config = VisionConfig(d_model=32, n_layer=2, d_state=8, img_size=32, patch_size=8, stride=8, num_classes=10)
    return mambaquant.save(init_weights(VisionMamba(config), seed=6).eval(), tmp_path_factory.mktemp("vim") / "vim")


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A working directory holding the user's own files."""
    (tmp_path / "notes.txt").write_text("the user's notes")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("First Citizen: before we proceed any further, hear me speak.\n" * 9)
    return tmp_path


@pytest.fixture
def written(cli, lm_dir, tmp_path) -> Path:
    """An output directory this tool wrote."""
    out = tmp_path / "written"
    result = cli.run("quantize", lm_dir, *FAST, "--out", out)
    assert result.code == 0, result.stderr
    return out


# --- 1. nothing the user did not create is ever deleted ------------------------------------------------------------

PROTECTED = {  # --out -> words of the refusal, run from `workdir`
    ".": "is the working directory",
    "./": "is the working directory",
    "..": "is a parent of the working directory",
    "/": "is a parent of the working directory",
    "data/..": "is the working directory",
}


@pytest.mark.parametrize("command", ["quantize", "analyze"])
@pytest.mark.parametrize("out", PROTECTED)
def test_overwrite_never_takes_the_working_directory_or_its_parents(cli, lm_dir, workdir, command, out):
    before = snapshot(workdir)
    extra = FAST if command == "quantize" else ["--calib-samples", "2", "--calib-len", "32", "--methods", "rtn"]
    result = cli.run(command, lm_dir, *extra, "--out", out, "--overwrite", cwd=workdir)
    assert_refused(result, PROTECTED[out])
    assert snapshot(workdir) == before


def test_overwrite_never_takes_home(cli, lm_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export A=1\n")
    (tmp_path / "elsewhere").mkdir()
    result = cli.run("quantize", lm_dir, *FAST, "--out", home, "--overwrite", cwd=tmp_path / "elsewhere",
                     env={"HOME": str(home)})
    assert_refused(result, "is the home directory")
    assert (home / ".bashrc").read_text() == "export A=1\n"


@pytest.mark.parametrize("command", ["quantize", "analyze"])
def test_overwrite_never_takes_the_source(cli, written, tmp_path, command):
    """The source is a directory this tool wrote, so only the source rule stops it."""
    before = snapshot(written)
    extra = ["--no-eval"] if command == "quantize" else ["--methods", "rtn"]
    result = cli.run(command, written, *extra, "--calib-samples", "2", "--calib-len", "32", "--out", written,
                     "--overwrite", cwd=tmp_path)
    assert_refused(result, "is the source")
    assert snapshot(written) == before


def test_overwrite_never_takes_a_directory_holding_the_source(cli, tmp_path):
    models = tmp_path / "models"
    config = LMConfig(d_model=16, n_layer=1, d_state=4, vocab_size=256, tie_embeddings=False)
    source = mambaquant.save(init_weights(MambaLM(config), seed=1), models / "lm")
    (models / MANIFEST).write_text(json.dumps({"written_by": "mambaquant", "files": {}}))
    before = snapshot(models)
    result = cli.run("quantize", source, *FAST, "--out", models, "--overwrite", cwd=tmp_path)
    assert_refused(result, "holding the source")
    assert snapshot(models) == before


def test_overwrite_refuses_a_directory_of_foreign_files(cli, lm_dir, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    result = cli.run("quantize", lm_dir, *FAST, "--out", out, "--overwrite", cwd=tmp_path)
    assert_refused(result, "did not write", MANIFEST)
    assert (out / "thesis.tex").read_text() == "three years of work"


def test_overwrite_refuses_an_empty_directory_without_a_manifest(cli, lm_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert_refused(cli.run("quantize", lm_dir, *FAST, "--out", out, "--overwrite", cwd=tmp_path), "did not write")
    assert out.is_dir()


@pytest.mark.parametrize("change", ["extra file", "extra hidden file", "file in a subdirectory", "modified file",
                                    "symlink", "forged manifest"])
def test_overwrite_refuses_our_directory_once_the_user_added_to_it(cli, lm_dir, written, tmp_path, change):
    if change == "extra file":
        (written / "my_results.csv").write_text("1,2,3\n")
    elif change == "extra hidden file":
        (written / ".env").write_text("TOKEN=x\n")
    elif change == "file in a subdirectory":
        (written / "plots").mkdir()
        (written / "plots" / "mine.png").write_bytes(b"\x89PNG")
    elif change == "modified file":
        with open(written / "MODEL_CARD.md", "a") as card:
            card.write("my own notes on this model\n")
    elif change == "symlink":
        (written / "link").symlink_to(tmp_path)
    else:
        (written / "precious.txt").write_text("keep me")
        (written / MANIFEST).write_text(json.dumps({"written_by": "someone", "files": {"precious.txt": 7}}))
    before = snapshot(written)
    result = cli.run("quantize", lm_dir, *FAST, "--out", written, "--overwrite", cwd=tmp_path)
    assert_refused(result, "did not write")
    assert snapshot(written) == before


def test_overwrite_replaces_a_directory_we_wrote_whole(cli, lm_dir, written, tmp_path):
    old = snapshot(written)
    result = cli.run("quantize", lm_dir, "--no-eval", "--calib-samples", "2", "--calib-len", "32", "--method",
                     "quarot", "--out", written, "--overwrite", cwd=tmp_path)
    assert result.code == 0, result.stderr
    new = snapshot(written)
    assert new != old and set(new) == set(old)
    assert json.loads(new["config.json"])["quantization_config"]["method"] == "quarot"
    assert staging_left(written.parent) == []
    assert mambaquant.load(written).quantization_report.config["method"] == "quarot"


def test_existing_output_needs_overwrite(cli, lm_dir, written, tmp_path):
    before = snapshot(written)
    assert_refused(cli.run("quantize", lm_dir, *FAST, "--out", written, cwd=tmp_path), "already exists",
                   "--overwrite")
    assert snapshot(written) == before


def test_overwrite_refuses_a_symlink(cli, lm_dir, written, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(written)
    before = snapshot(written)
    assert_refused(cli.run("quantize", lm_dir, *FAST, "--out", link, "--overwrite", cwd=tmp_path),
                   "symbolic link")
    assert link.is_symlink() and snapshot(written) == before


def test_dangling_symlink_as_output(cli, lm_dir, tmp_path):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    assert_refused(cli.run("quantize", lm_dir, *FAST, "--out", link, cwd=tmp_path), "symbolic link")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_that_is_a_file(cli, lm_dir, tmp_path, overwrite):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the user's file")
    assert_refused(cli.run("quantize", lm_dir, *FAST, "--out", target, *overwrite, cwd=tmp_path), "not a directory")
    assert target.read_bytes() == b"the user's file"


def test_output_below_a_file(cli, lm_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_refused(cli.run("quantize", lm_dir, *FAST, "--out", tmp_path / "afile" / "out", cwd=tmp_path),
                   "is not a directory")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("command", ["quantize", "analyze"])
@pytest.mark.parametrize("out", ["", " "])
def test_empty_output_path(cli, lm_dir, tmp_path, command, out):
    before = snapshot(tmp_path)
    assert_refused(cli.run(command, lm_dir, "--out", out, cwd=tmp_path), "expected a path")
    assert snapshot(tmp_path) == before


def test_output_checked_before_the_work(cli, lm_dir, tmp_path):
    """A refused --out costs no quantization: the refusal comes before the model is even loaded."""
    (tmp_path / "afile").write_text("x")
    started = time.perf_counter()
    result = cli.run("quantize", "mamba-shakespeare", "--method", "gptq", "--out", tmp_path / "afile" / "o",
                     cwd=tmp_path)
    assert_refused(result, "is not a directory")
    assert time.perf_counter() - started < 20


def test_analyze_replaces_its_own_report(cli, lm_dir, tmp_path):
    out = tmp_path / "report"
    args = ("analyze", lm_dir, "--calib-samples", "2", "--calib-len", "32", "--methods", "rtn", "--out", out)
    assert cli.run(*args, cwd=tmp_path).code == 0
    assert (out / MANIFEST).is_file() and (out / "index.html").is_file()
    (out / "summary.md").write_text("edited by the user")
    assert_refused(cli.run(*args, "--overwrite", cwd=tmp_path), "did not write", "summary.md")
    assert (out / "summary.md").read_text() == "edited by the user"


def test_stale_staging_of_a_killed_run_is_cleaned(cli, lm_dir, tmp_path):
    dead_pid = 4_194_305  # above Linux's largest pid_max: never a live process
    stale = tmp_path / f".out.mambaquant-staging-{dead_pid}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    live = tmp_path / f".out.mambaquant-staging-{os.getpid()}-def456"  # a run still going: left alone
    live.mkdir()
    unrelated = tmp_path / ".out.backup"
    unrelated.mkdir()
    result = cli.run("quantize", lm_dir, *FAST, "--out", tmp_path / "out", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert not stale.exists() and live.is_dir() and unrelated.is_dir()


def test_old_output_left_aside_by_a_kill_is_restored(cli, lm_dir, written, tmp_path):
    """A kill between moving the old output aside and the new one in (where the exchange is not available)."""
    aside = written.parent / f".{written.name}.mambaquant-old-4194305-xyz"
    os.rename(written, aside)
    result = cli.run("quantize", lm_dir, *FAST, "--out", written.parent / "other", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert written.is_dir() and not aside.exists()
    mambaquant.load(written)


# --- 2. atomic under every way a process ends -----------------------------------------------------------------------

def start_quantize(out: Path) -> subprocess.Popen:
    """A real `python -m mambaquant quantize` that takes a while, with stderr a pipe (plain progress lines)."""
    return subprocess.Popen([sys.executable, "-m", "mambaquant", "quantize", "mamba-shakespeare", "--method", "rtn",
                             "--calib-samples", "16", "--eval-samples", "100", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_exit_cleanly(tmp_path, signum):
    process = start_quantize(tmp_path / "out")
    first = process.stderr.readline()  # the first block is done: the work is under way
    assert "block 1/" in first, first
    process.send_signal(signum)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    assert rest.strip().splitlines()[-1] == ("mambaquant: interrupted" if signum == signal.SIGINT else
                                             f"mambaquant: terminated by {signal.Signals(signum).name}")
    assert "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


KILL_DURING_SAVE = """
import os, signal, sys
from pathlib import Path
from mambaquant.cli import on_signal
from mambaquant.outputs import write_atomic_dir
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, on_signal)
def write(staging):
    (staging / "config.json").write_text("new")
    os.kill(os.getpid(), int(sys.argv[2]))
    (staging / "model.safetensors").write_text("new")
try:
    write_atomic_dir(Path(sys.argv[1]), write, overwrite=True)
except BaseException as e:
    sys.exit(type(e).__name__)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL])
def test_a_signal_while_writing_leaves_the_old_output_whole(cli, lm_dir, written, tmp_path, signum):
    old = snapshot(written)
    process = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(written), str(int(signum))], cwd=ROOT,
                             capture_output=True, text=True, check=False)
    assert snapshot(written) == old
    left = staging_left(written.parent)
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL and len(left) == 1 and left[0].startswith(".")
        result = cli.run("quantize", lm_dir, *FAST, "--out", written, "--overwrite", cwd=tmp_path)
        assert result.code == 0, result.stderr
        left = staging_left(written.parent)  # the next run cleaned it
    else:
        assert process.stderr.strip() in ("KeyboardInterrupt", "Terminated"), process.stderr
    assert left == []


@pytest.fixture
def compare_args(lm_dir):
    return ["compare", lm_dir, "--methods", "fp,rtn", "--bits", "w8a8", "--granularity", "tensor",
            "--eval-samples", "2", "--calib-samples", "2", "--calib-len", "32"]


def test_reports_through_a_device_and_a_symlink(cli, compare_args, tmp_path):
    target = tmp_path / "rows.json"
    target.write_text("[]")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    result = cli.run(*compare_args, "--json", link, "--markdown", "/dev/null", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert link.is_symlink() and len(json.loads(target.read_text())) == 2
    assert Path("/dev/null").is_char_device()


def test_report_to_dev_stdout(cli, compare_args, tmp_path):
    result = cli.run(*compare_args, "--json", "/dev/stdout", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert '"method": "rtn"' in result.stdout


def test_report_through_a_fifo(cli, compare_args, tmp_path):
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    result = cli.run(*compare_args, "--markdown", fifo, cwd=tmp_path)
    reader.join(timeout=60)
    assert result.code == 0, result.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and "| rtn | w8a8 |" in received[0]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_report_files_follow_the_umask(cli, compare_args, tmp_path, mask):
    result = cli.run(*compare_args, "--json", tmp_path / "rows.json", cwd=tmp_path, umask=mask)
    assert result.code == 0, result.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "rows.json").st_mode) == 0o666 & ~mask


def test_saved_directories_follow_the_umask(cli, lm_dir, tmp_path):
    assert cli.run("quantize", lm_dir, *FAST, "--out", tmp_path / "out", cwd=tmp_path, umask=0o027).code == 0
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "config.json").st_mode) == 0o640


def test_disk_full_is_one_line(cli, compare_args, tmp_path):
    assert_failed_after_progress(cli.run(*compare_args, "--json", "/dev/full", cwd=tmp_path), "/dev/full",
                                 "No space left")


BAD_REPORT_PATHS = {  # --json value (relative to tmp_path) -> words
    "missing/rows.json": "not an existing directory",
    ".": "is a directory",
    "afile/rows.json": "not an existing directory",
    "": "expected a path",
}


@pytest.mark.parametrize("flag", ["--json", "--markdown"])
@pytest.mark.parametrize("path", BAD_REPORT_PATHS)
def test_report_paths_checked_before_the_first_run(cli, compare_args, tmp_path, flag, path):
    (tmp_path / "afile").write_text("x")
    result = cli.run(*compare_args, "--methods", "fp,rtn,gptq,quarot,mambaquant", flag, path, cwd=tmp_path)
    assert_refused(result, BAD_REPORT_PATHS[path])
    assert "runs x" not in result.stdout  # refused before any run started


def test_same_report_path_twice(cli, compare_args, tmp_path):
    assert_refused(cli.run(*compare_args, "--json", "r", "--markdown", "r", cwd=tmp_path), "two different files")


def test_a_bad_second_source_keeps_the_first_results(cli, compare_args, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    args = [*compare_args[:2], broken, *compare_args[2:], "--json", tmp_path / "rows.json"]
    result = cli.run(*args, cwd=tmp_path)
    assert_failed_after_progress(result, "broken", "are kept")
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {row["method"] for row in rows} == {"fp", "rtn"}
    assert "rtn" in result.stdout  # the table of the finished source


# --- 6. options -----------------------------------------------------------------------------------------------------

BAD_OPTIONS = {  # case -> (argv after the source, words)
    "temperature negative": (["generate", "--prompt", "Hi", "--temperature", "-1"], "finite temperature"),
    "temperature nan": (["generate", "--prompt", "Hi", "--temperature", "nan"], "finite temperature"),
    "temperature inf": (["generate", "--prompt", "Hi", "--temperature", "inf"], "finite temperature"),
    "temperature word": (["generate", "--prompt", "Hi", "--temperature", "hot"], "finite temperature"),
    "top-k 0": (["generate", "--prompt", "Hi", "--top-k", "0"], "positive integer"),
    "top-k negative": (["generate", "--prompt", "Hi", "--top-k", "-3"], "positive integer"),
    "top-k float": (["generate", "--prompt", "Hi", "--top-k", "2.5"], "positive integer"),
    "max-new-tokens 0": (["generate", "--prompt", "Hi", "--max-new-tokens", "0"], "positive integer"),
    "empty prompt": (["generate", "--prompt", ""], "prompt is empty"),
    "generate seed negative": (["generate", "--prompt", "Hi", "--seed", "-1"], "out of range"),
    "generate seed 2^63": (["generate", "--prompt", "Hi", "--seed", str(2**63)], "out of range"),
    "quantize seed huge": (["quantize", "--seed", "1" + "0" * 40], "out of range"),
    "quantize seed word": (["quantize", "--seed", "lucky"], "expected an integer seed"),
    "compare seed negative": (["compare", "--seed", "-5"], "out of range"),
    "analyze seed float": (["analyze", "--out", "x", "--seed", "1.5"], "expected an integer seed"),
    "weight bits 8.0": (["quantize", "--w-bits", "8.0"], "expected a bit width"),
    "weight bits empty": (["quantize", "--w-bits", ""], "expected a bit width"),
    "activation bits 32": (["quantize", "--a-bits", "32"], "not supported"),
    "calib samples negative": (["quantize", "--calib-samples", "-5"], "positive integer"),
    "calib samples huge": (["quantize", "--calib-samples", "1000000000"], "expected --calib-samples at most"),
    "calib samples over the image set": (["quantize", "--calib-samples", "60000", "--calib", "cifar10-train"],
                                         "images, and the model is a token model"),
    "calib length 0": (["quantize", "--calib-len", "0"], "positive integer"),
    "eval samples 0": (["quantize", "--eval-samples", "0"], "positive integer"),
    "eval samples word": (["eval", "--eval-samples", "all"], "positive integer"),
    "image calibration for a language model": (["quantize", "--calib", "cifar10-train"], "is images"),
    "unknown backend": (["eval", "--backend", "cuda"], "invalid choice"),
    "unknown granularity": (["quantize", "--act-granularity", "channel"], "invalid choice"),
    "int8 backend without quantized weights": (["quantize", "--w-bits", "16", "--backend", "int8", "--no-eval"],
                                               "needs a model with quantized weights"),
    "compare empty methods": (["compare", "--methods", ","], "comma-separated list"),
    "compare unknown method": (["compare", "--methods", "fp,awq"], "unknown method 'awq'"),
    "compare unknown bits": (["compare", "--bits", "w9a9"], "unknown bit widths"),
    "compare unknown granularity": (["compare", "--granularity", "channel"], "unknown granularity"),
    "analyze fp method": (["analyze", "--out", "x", "--methods", "fp"], "unknown method"),
    "analyze unknown method": (["analyze", "--out", "x", "--methods", "rtn,awq"], "unknown method"),
    "calibration file missing": (["quantize", "--calib", "no/such/file.txt"], "unknown calibration set"),
    "tokenizer missing": (["generate", "--prompt", "Hi", "--tokenizer", "no/such/tokenizer.json"], "no such file; expected a tokenizer.json"),
    "unknown option": (["quantize", "--bits-w", "8"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options(cli, lm_dir, tmp_path, case):
    argv, words = BAD_OPTIONS[case]
    before = snapshot(tmp_path)
    result = cli.run(argv[0], lm_dir, *argv[1:], cwd=tmp_path)
    assert_refused(result, words)
    assert snapshot(tmp_path) == before


def test_text_calibration_for_a_vision_model(cli, vim_dir, tmp_path):
    assert_refused(cli.run("quantize", vim_dir, "--calib", "shakespeare-train", "--no-eval", cwd=tmp_path),
                   "is text, and the model is a vision model")


def test_generate_needs_a_language_model(cli, vim_dir, tmp_path):
    assert_refused(cli.run("generate", vim_dir, "--prompt", "Hi", cwd=tmp_path), "needs a language model")


def test_prompt_that_is_not_utf8_is_read_as_bytes(lm_dir):
    """A byte-level model takes the prompt's bytes as they are (argv is bytes on POSIX)."""
    prompt = b"caf\xe9 \xff"
    process = subprocess.run([sys.executable.encode(), b"-m", b"mambaquant", b"generate", os.fsencode(lm_dir),
                              b"--prompt", prompt, b"--max-new-tokens", b"3", b"--temperature", b"0"], cwd=ROOT,
                             capture_output=True, check=False)
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith(prompt)


# --- 6. the Python API raises InputError with the same messages ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm():
    return init_weights(MambaLM(LMConfig(d_model=16, n_layer=1, d_state=4, vocab_size=256, tie_embeddings=False)), 1)


BAD_CALIBRATION = {  # case -> (inputs, words)
    "float tokens": (torch.rand(2, 8), "integer tensor of token ids"),
    "rank 1": (torch.randint(0, 256, (8,)), "shape (N, L)"),
    "rank 3": (torch.randint(0, 256, (2, 4, 8)), "shape (N, L)"),
    "bool": (torch.ones(2, 8, dtype=torch.bool), "integer tensor"),
    "ids past the vocabulary": (torch.full((2, 8), 256), "must lie in 0..255"),
    "negative ids": (torch.full((2, 8), -1), "must lie in 0..255"),
    "no samples": (torch.zeros(0, 8, dtype=torch.long), "empty"),
    "empty sequences": (torch.zeros(2, 0, dtype=torch.long), "length of at least one"),
    "a list": ([[1, 2, 3]], "calib must be a tensor"),
}


@pytest.mark.parametrize("case", BAD_CALIBRATION)
def test_bad_calibration_tensors(tiny_lm, case):
    inputs, words = BAD_CALIBRATION[case]
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        mambaquant.quantize(tiny_lm, method="rtn", calib=inputs)


def test_bad_calibration_images():
    model = init_weights(VisionMamba(VisionConfig(d_model=16, n_layer=1, d_state=4, img_size=32, patch_size=8,
                                                  stride=8, num_classes=10)), 1)
    for inputs in (torch.rand(2, 3, 16, 16), torch.randint(0, 255, (2, 3, 32, 32)), torch.full((2, 3, 32, 32), float("inf"))):
        with pytest.raises(InputError, match="calibration (images|inputs)"):
            mambaquant.quantize(model, method="rtn", calib=inputs)


BAD_GENERATE = {  # case -> (kwargs, words)
    "zero new tokens": ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    "float new tokens": ({"max_new_tokens": 2.0}, "max_new_tokens must be a positive integer"),
    "negative temperature": ({"temperature": -0.5}, "temperature must be"),
    "nan temperature": ({"temperature": float("nan")}, "temperature must be"),
    "top_k 0": ({"top_k": 0}, "top_k must be"),
    "float prompt": ({"input_ids": torch.rand(1, 3)}, "integer tensor of token ids"),
    "prompt past the vocabulary": ({"input_ids": torch.tensor([[300]])}, "outside 0..255"),
    "empty prompt": ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "prompt is empty"),
}


@pytest.mark.parametrize("case", BAD_GENERATE)
def test_bad_generate_arguments(tiny_lm, case):
    kwargs, words = BAD_GENERATE[case]
    arguments = {"input_ids": torch.tensor([[1, 2]]), "max_new_tokens": 2, **kwargs}
    with pytest.raises(InputError, match=words):
        tiny_lm.generate(**arguments)


@pytest.mark.parametrize("overwrite", [False, True])
def test_api_save_refuses_what_the_cli_refuses(tiny_lm, tmp_path, overwrite):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(InputError):
        mambaquant.save(tiny_lm, tmp_path, overwrite=overwrite)
    with pytest.raises(InputError, match="expected a directory path"):
        mambaquant.save(tiny_lm, "")
    assert (tmp_path / "mine.txt").read_text() == "x"


# --- 8. stderr: one line on failure, progress lines when it is a log ------------------------------------------------

def test_dependency_warnings_do_not_precede_the_error(cli, tmp_path):
    """A legacy (non-zip) torch checkpoint makes torch warn; the refusal is still the only line."""
    state = {"backbone.embeddings.weight": torch.zeros(256, 16)}  # no layers: refused
    torch.save(state, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    assert_refused(cli.run("eval", tmp_path / "old.bin", cwd=tmp_path), "old.bin")


def test_progress_lines_in_a_log(cli, lm_dir, tmp_path):
    result = cli.run("quantize", lm_dir, *FAST, cwd=tmp_path)
    assert result.code == 0
    lines = result.stderr.strip().splitlines()
    assert lines == [line for line in lines if "done" in line] and any("block 2/2 done" in line for line in lines)


def test_compare_progress_lines_name_each_run(cli, compare_args, tmp_path):
    result = cli.run(*compare_args, cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "run 2/2 done (rtn w8a8 tensor)" in result.stderr


def test_evaluation_buffers_are_checked_before_the_model_runs():
    """A model that fits whose logits over one WikiText-2 window would not (2,048 x 3,000,000 x 4 bytes x 3)."""
    from mambaquant.evaluation.text import perplexity

    model = MambaLM(LMConfig(d_model=8, n_layer=1, d_state=4, vocab_size=3_000_000, tie_embeddings=True))
    with pytest.raises(InputError, match="evaluating a WikiText-2 window .* needs .* of memory"):
        perplexity(model, list(range(4096)))


def test_main_gives_back_the_callers_signal_handlers(capsys):
    """In-process callers (tests, notebooks) keep their own SIGTERM/SIGHUP/SIGINT handling after a command."""
    from mambaquant.cli import main

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    assert main(["zoo", "--json"]) == 0
    assert main(["eval", "no/such/model"]) == 2
    assert {s: signal.getsignal(s) for s in before} == before
