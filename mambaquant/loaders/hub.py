"""Models by their Hugging Face hub id: `org/name` or `org/name@REVISION` (a branch, tag or commit) is the snapshot
directory of that revision in the Hugging Face cache, which the loaders read like any model directory.

A snapshot already in the cache is used without asking the hub (a branch is the commit it was when it was cached;
`hf download` brings it up to date). Otherwise only the files mambaquant reads are fetched: the config, the
safetensors weights and their index, the tokenizer, and the torch pickle only for a repository without safetensors.
huggingface_hub finds the token (HF_TOKEN, `hf auth login`); the cache (HF_HUB_CACHE, HF_HOME) and offline mode
(HF_HUB_OFFLINE) are read from the environment at each call, because huggingface_hub reads them once, at import."""

import os
import re
from functools import partial
from pathlib import Path

from ..errors import InputError
from ..schema import display
from .weights import WEIGHT_FILES

HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>\w[\w./-]*))?", re.ASCII)
MODEL_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"]
PICKLE_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
EXPECTED = "a Hugging Face hub id (org/name or org/name@revision)"


def parse_hub_id(source) -> tuple[str, str | None] | None:
    """`org/name[@revision]` -> (repo id, revision or None); None for anything else."""
    match = HUB_ID.fullmatch(source) if isinstance(source, str) else None
    if match is None or ".." in (match["revision"] or ""):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return match["repo"], match["revision"]


def pinned(source: str, revision: str) -> str:
    """Hub id `source` at `revision` (`--revision`, `revision=`), as `org/name@revision`."""
    parsed = parse_hub_id(source)
    if parsed is None:
        raise InputError(f"{display(source)}: not a model directory, a checkpoint file nor an embedded model, and "
                         f"not {EXPECTED}; a revision applies to hub ids only")
    repo_id, given = parsed
    if not isinstance(revision, str) or parse_hub_id(f"{repo_id}@{revision}") is None:
        raise InputError(f"revision {display(repr(revision))}: expected a branch, tag or commit (letters, digits, "
                         "'.', '_', '-', '/')")
    if given not in (None, revision):
        raise InputError(f"{display(source)}: names revision {given}, and --revision (revision=) gives "
                         f"{display(revision)}; expected one revision")
    return f"{repo_id}@{revision}"


def cache_dir() -> str:
    """HF_HUB_CACHE, else HF_HOME/hub, as the environment says now; else huggingface_hub's default."""
    from huggingface_hub import constants

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = os.path.join(os.environ["HF_HOME"], "hub")
    return os.path.expanduser(cache) if cache else constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in constants.ENV_VARS_TRUE_VALUES


def snapshot_directory(source: str) -> Path:
    """The local snapshot of hub id `source`: the cached one, else fetched; one line for what cannot be had."""
    repo_id, revision = parse_hub_id(source)
    cached = cached_snapshot(repo_id, revision)
    if cached is not None:
        return cached
    if offline():
        raise not_cached(source, repo_id, revision, "the hub is offline (HF_HUB_OFFLINE=1)")
    return download(source, repo_id, revision)


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot of a revision, if it holds a model (not merely files another tool fetched); no network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), allow_patterns=MODEL_FILES,
                                        local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    has_model = (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES)
    return folder if has_model else None


def cached_snapshot_of(source) -> Path | None:
    """The cached snapshot a hub id names (nothing is fetched); None for anything else."""
    parsed = parse_hub_id(source)
    return cached_snapshot(*parsed) if parsed else None


def download(source: str, repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    fetch = partial(snapshot_download, repo_id, cache_dir=cache_dir())
    try:
        folder = Path(fetch(revision=revision, allow_patterns=MODEL_FILES))
        if not any(folder.glob("model*.safetensors")):
            folder = Path(fetch(revision=folder.name, allow_patterns=PICKLE_FILES))  # folder.name: the commit
    except RevisionNotFoundError:
        raise InputError(f"{display(source)}: the Hugging Face hub has no revision {revision} of {repo_id}; expected "
                         "a branch, tag or commit of it") from None
    except GatedRepoError:
        raise InputError(f"{display(source)}: a gated model; accept its terms on huggingface.co and log in (`hf auth "
                         "login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise InputError(f"{display(source)}: no such file or directory, and no such model on the Hugging Face hub "
                         "(or a private one: log in with `hf auth login` or set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise InputError(f"{display(source)}: the Hugging Face hub refused it ({first_line(e)})") from None
    except LocalEntryNotFoundError as e:  # huggingface_hub's answer when the hub cannot be reached
        raise not_cached(source, repo_id, revision, f"the hub could not be reached ({first_line(e.__cause__ or e)})")
    return folder


def not_cached(source: str, repo_id: str, revision: str | None, why: str) -> InputError:
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir())
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    if revision is not None and (repo / "snapshots").is_dir():
        refs = sorted(p.relative_to(repo / "refs").as_posix() for p in (repo / "refs").rglob("*") if p.is_file())
        cached = refs or sorted(p.name for p in (repo / "snapshots").iterdir())
        missing = f"revision {revision} of {repo_id} is not in the Hugging Face cache (it has {', '.join(cached)})"
    else:
        missing = f"no such file or directory, and not in the Hugging Face cache ({display(cache)})"
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    return InputError(f"{display(source)}: {missing} and {why}; download it where there is network (`{command}`) or "
                      "pass a local model directory")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
