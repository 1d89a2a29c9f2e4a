"""Models by their Hugging Face hub id (`org/name`, `org/name@rev`), read from a cache laid out exactly as
huggingface_hub lays it out (blobs/, snapshots/<commit>/ of relative symlinks, refs/main). No test reaches the
network: every connection is refused and recorded, and the tests that need a cached snapshot assert none was tried."""

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

import mambaquant
from mambaquant.calibration import resolve_calibration
from mambaquant.cli import main
from mambaquant.errors import InputError
from mambaquant.runtime import LMConfig, MambaLM
from mambaquant.tokenizer import own_tokenizer

MAMBA1 = "mamba-org/tiny-mamba"  # sharded safetensors: the shards are symlinks into blobs/
MAMBA2 = "mamba-org/tiny-mamba2"
BPE = "mamba-org/tiny-bpe"  # ships a tokenizer.json
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
TOKENS = torch.tensor([[72, 101, 108, 108, 111, 32, 119]])


def add_to_cache(cache: Path, repo_id: str, files: Path, commit: str = COMMIT, refs=("main",)) -> Path:
    """`files` as huggingface_hub caches a snapshot: blobs/<sha256>, snapshots/<commit>/<name> -> ../../blobs/...,
    refs/<branch> holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def small_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(["to be or not to be, that is the question"] * 20,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A Hugging Face cache with three small random models saved by transformers' save_pretrained."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    saved = root / "saved"
    MambaForCausalLM(MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8,
                                 initializer_range=0.02)).save_pretrained(saved / "m1", max_shard_size="100KB")
    Mamba2ForCausalLM(Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8, num_heads=8,
                                   head_dim=16, n_groups=1, initializer_range=0.02)).save_pretrained(saved / "m2")
    MambaForCausalLM(MambaConfig(vocab_size=600, hidden_size=32, num_hidden_layers=1, state_size=4,
                                 initializer_range=0.02)).save_pretrained(saved / "bpe")
    small_tokenizer(saved / "bpe" / "tokenizer.json")
    cache = root / "cache"
    add_to_cache(cache, MAMBA1, saved / "m1")
    add_to_cache(cache, MAMBA2, saved / "m2")
    add_to_cache(cache, MAMBA2, saved / "m1", commit=OTHER_COMMIT, refs=("other-branch",))
    add_to_cache(cache, BPE, saved / "bpe")
    return cache


def snapshot_of(cache: Path, repo_id: str, commit: str = COMMIT) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit


@pytest.fixture
def connections(monkeypatch) -> list:
    """Every network connection refused, and recorded."""
    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tried


@pytest.fixture(autouse=True)
def hub_env(cache, connections, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # no local path named like the repos


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def one_line_error(call) -> str:
    with pytest.raises(InputError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("repo_id", [MAMBA1, MAMBA2])
def test_a_hub_id_loads_what_its_snapshot_directory_loads(cache, repo_id):
    by_id = mambaquant.load(repo_id)
    assert torch.equal(logits(by_id), logits(mambaquant.load(snapshot_of(cache, repo_id))))


def test_a_cached_snapshot_is_used_without_asking_the_hub(cache, connections, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert torch.equal(logits(mambaquant.load(MAMBA1)), logits(mambaquant.load(snapshot_of(cache, MAMBA1))))
    assert connections == []


def test_revisions_by_commit_branch_and_keyword(cache):
    expected = logits(mambaquant.load(snapshot_of(cache, MAMBA2)))
    for model in (mambaquant.load(f"{MAMBA2}@{COMMIT}"), mambaquant.load(f"{MAMBA2}@main"),
                  mambaquant.load(MAMBA2, revision="main"), mambaquant.load(f"{MAMBA2}@main", revision="main")):
        assert torch.equal(logits(model), expected)
    other = mambaquant.load(MAMBA2, revision="other-branch")  # the Mamba-1 files, cached as another branch
    assert torch.equal(logits(other), logits(mambaquant.load(snapshot_of(cache, MAMBA1))))


def test_a_revision_not_in_the_cache_is_one_line_naming_it():
    message = one_line_error(lambda: mambaquant.load(f"{MAMBA1}@v9"))
    assert "revision v9 of mamba-org/tiny-mamba is not in the Hugging Face cache (it has main)" in message
    assert "`hf download mamba-org/tiny-mamba --revision v9`" in message and "HF_HUB_OFFLINE" in message
    assert "revision ffff" in one_line_error(lambda: mambaquant.load(MAMBA1, revision="f" * 40))


def test_a_repo_not_in_the_cache_offline_says_what_to_do(cache):
    message = one_line_error(lambda: mambaquant.load("mamba-org/absent"))
    assert message.startswith(f"mamba-org/absent: no such file or directory, and not in the Hugging Face cache "
                              f"({cache}) and the hub is offline (HF_HUB_OFFLINE=1)")
    assert "HF_HUB_OFFLINE=1" in message and "`hf download mamba-org/absent`" in message
    assert "pass a local model directory" in message


def test_an_unreachable_hub_is_one_line(connections, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    message = one_line_error(lambda: mambaquant.load("mamba-org/absent"))
    assert "not in the Hugging Face cache" in message and "the hub could not be reached" in message
    assert "`hf download mamba-org/absent`" in message


@pytest.mark.parametrize("source", ["a/b/c", "a//b", "/b", "a/", "a/b@", "a/b@x@y", "a--b/c", "a/b.", "a/b c",
                                    "a/b@x..y", "a/b@x y"])
def test_a_malformed_id_is_a_missing_path(source):
    message = one_line_error(lambda: mambaquant.load(source))
    assert "no such file or directory" in message and "Hugging Face hub id" in message


def test_a_revision_needs_a_hub_id_and_one_revision(tmp_path):
    assert "names revision main, and --revision (revision=) gives v2" in one_line_error(
        lambda: mambaquant.load(f"{MAMBA1}@main", revision="v2"))
    assert "typeseg: is an embedded model; a revision (main) applies to a Hugging Face hub id" in one_line_error(
        lambda: mambaquant.load("typeseg", revision="main"))
    assert "is a local path" in one_line_error(lambda: mambaquant.load(tmp_path, revision="main"))
    assert "is a MambaLM" in one_line_error(
        lambda: mambaquant.load(MambaLM(LMConfig(d_model=8, n_layer=1, d_state=4, vocab_size=256)), revision="main"))
    assert "revision 'a b'" in one_line_error(lambda: mambaquant.load(MAMBA1, revision="a b"))
    assert "not a model directory" in one_line_error(lambda: mambaquant.load("a/b/c", revision="main"))
    assert "revision (main)" in one_line_error(lambda: mambaquant.quantize("typeseg", revision="main"))


def test_a_local_directory_named_like_a_hub_id_wins(cache, tmp_path):
    local = tmp_path / MAMBA1
    mambaquant.save(mambaquant.load(snapshot_of(cache, MAMBA2)), local)  # another model under the same name
    assert torch.equal(logits(mambaquant.load(MAMBA1)), logits(mambaquant.load(snapshot_of(cache, MAMBA2))))
    assert "is a local path" in one_line_error(lambda: mambaquant.load(MAMBA1, revision="main"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


CLI_REFUSALS = {  # argv -> words of the one line
    "offline, not cached": (["eval", "mamba-org/absent"], "`hf download mamba-org/absent`"),
    "revision not cached": (["eval", MAMBA1, "--revision", "v9"], "revision v9 of mamba-org/tiny-mamba"),
    "two revisions": (["quantize", f"{MAMBA1}@main", "--revision", "v2"], "names revision main"),
    "revision of an embedded model": (["generate", "mamba-shakespeare", "--prompt", "Hi", "--revision", "main"],
                                      "is an embedded model"),
    "malformed id": (["analyze", "a/b/c", "--out", "report"], "Hugging Face hub id"),
    "compare, not cached": (["compare", f"{MAMBA1}@v9", "--methods", "rtn"], "revision v9"),
    "stream, not cached": (["quantize", "mamba-org/absent", "--stream", "--out", "q"], "not in the Hugging Face cache"),
}


@pytest.mark.parametrize("case", CLI_REFUSALS)
def test_the_cli_refuses_in_one_line(capsys, case):
    argv, words = CLI_REFUSALS[case]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and words in err and "Traceback" not in err
    assert err.startswith("mambaquant: error: ") and err.count("\n") == 1


def test_eval_and_quantize_take_a_hub_id(cache, capsys):
    code, out, _ = run_cli(capsys, "eval", MAMBA1, "--eval-samples", "2", "--json")
    assert code == 0
    by_id = json.loads(out)
    code, out, _ = run_cli(capsys, "eval", snapshot_of(cache, MAMBA1), "--eval-samples", "2", "--json")
    assert by_id["value"] == json.loads(out)["value"] and by_id["model"] == MAMBA1
    code, out, err = run_cli(capsys, "quantize", MAMBA2, "--revision", COMMIT, "--method", "rtn", "--no-eval",
                             "--calib-samples", "2", "--calib-len", "32")
    assert code == 0, err
    assert "rtn" in out


def test_streamed_quantization_reads_the_snapshot_in_place(cache, tmp_path, capsys):
    cached = files_of(cache)
    options = dict(method="rtn", calib_samples=2, calib_len=32)
    by_path = mambaquant.quantize(snapshot_of(cache, MAMBA1), out=tmp_path / "by-path", **options)
    by_id = mambaquant.quantize(MAMBA1, out=tmp_path / "by-id", revision="main", **options)
    code, _, err = run_cli(capsys, "quantize", MAMBA1, "--stream", "--out", tmp_path / "cli", "--method", "rtn",
                           "--calib-samples", "2", "--calib-len", "32")
    assert code == 0, err
    for out in (by_id, tmp_path / "cli"):
        assert files_of(out) == files_of(by_path)
    assert files_of(cache) == cached  # nothing copied nor written there


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_snapshot_tokenizer_is_used_for_a_bpe_vocabulary(cache, capsys):
    tokenizer = snapshot_of(cache, BPE) / "tokenizer.json"
    assert own_tokenizer(BPE) == own_tokenizer(f"{BPE}@main") == tokenizer
    assert own_tokenizer(MAMBA1) is None and own_tokenizer("mamba-org/absent") is None
    code, out, err = run_cli(capsys, "generate", BPE, "--prompt", "to be", "--max-new-tokens", "3",
                             "--temperature", "0")
    assert code == 0, err
    assert out.startswith("to be")
    # text calibration of a model with a BPE vocabulary (GPT-NeoX-sized) takes the source's own tokenizer
    model = MambaLM(LMConfig(d_model=8, n_layer=1, d_state=4, vocab_size=50280)).eval()
    by_id = resolve_calibration(model, BPE, "shakespeare-train", samples=2, length=16)
    given = resolve_calibration(model, "my model", "shakespeare-train", samples=2, length=16, tokenizer=str(tokenizer))
    assert all(torch.equal(a, b) for a, b in zip(by_id, given, strict=True)) and max(b.max() for b in by_id) < 300


def test_analyze_and_compare_take_a_hub_id(capsys, tmp_path):
    code, _, err = run_cli(capsys, "analyze", MAMBA2, "--revision", "main", "--out", tmp_path / "report", "--methods",
                           "rtn", "--calib-samples", "2", "--calib-len", "32")
    assert code == 0, err
    assert json.loads((tmp_path / "report" / "stats.json").read_text())["model"] == f"{MAMBA2}@main"
    code, out, err = run_cli(capsys, "compare", f"{MAMBA1}@{COMMIT}", "--methods", "fp,rtn", "--bits", "w8a8",
                             "--granularity", "tensor", "--eval-samples", "1", "--calib-samples", "2", "--calib-len",
                             "32", "--json", tmp_path / "rows.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {row["model"] for row in rows} == {f"{MAMBA1}@{COMMIT}"} and {row["method"] for row in rows} == {"fp", "rtn"}


def test_a_missing_snapshot_fetches_only_the_files_read(cache, tmp_path, monkeypatch):
    """The hub replaced by a directory: a repository without safetensors gets its config, then its torch pickle, and
    nothing else; a second load finds it cached and asks nothing."""
    import fnmatch

    import huggingface_hub

    remote = tmp_path / "remote"
    remote.mkdir()
    for name in ("config.json", "generation_config.json"):
        (remote / name).write_bytes((snapshot_of(cache, MAMBA1) / name).read_bytes())
    model = mambaquant.load(snapshot_of(cache, MAMBA1))
    torch.save(mambaquant.loaders.read_tensors(snapshot_of(cache, MAMBA1) / "model.safetensors.index.json"),
               remote / "pytorch_model.bin")
    (remote / "README.md").write_text("a model card")
    real, fetched = huggingface_hub.snapshot_download, []

    def from_remote(repo_id, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False):
        if local_files_only:
            return real(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns,
                        local_files_only=True)
        wanted = [p for p in remote.iterdir() if any(fnmatch.fnmatch(p.name, pattern) for pattern in allow_patterns)]
        fetched.append((revision, sorted(p.name for p in wanted)))
        files = tmp_path / f"fetch-{len(fetched)}"
        files.mkdir()
        for path in wanted:
            (files / path.name).write_bytes(path.read_bytes())
        snapshot = snapshot_of(Path(cache_dir), "mamba-org/pickled")
        if snapshot.exists():  # the second fetch adds to the first one's snapshot
            for path in files.iterdir():
                path.rename(snapshot / path.name)
            return str(snapshot)
        return str(add_to_cache(Path(cache_dir), "mamba-org/pickled", files))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", from_remote)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert torch.equal(logits(mambaquant.load("mamba-org/pickled")), logits(model))
    assert fetched == [(None, ["config.json"]), (COMMIT, ["pytorch_model.bin"])]
    assert torch.equal(logits(mambaquant.load("mamba-org/pickled")), logits(model)) and len(fetched) == 2
