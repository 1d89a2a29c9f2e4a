"""lm-eval tasks without a download: the tasks shipped with mambaquant, lm-eval's own tasks pointed at local data
(the data directory's LAMBADA, or a file the user names), and task YAMLs of the user's. Every task is resolved and
its data read before any model runs, so a task that cannot run fails first, in one line.

`python -m mambaquant.evaluation.local_tasks` re-creates the shipped shakespeare_mc data."""

import difflib
import json
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..data import shared_data_dir, tinyshakespeare_validation
from ..errors import InputError
from ..schema import display

LM_EVAL_VERSION = "0.4.13"
TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
# The zero-shot tasks of the MambaQuant and Quamba papers, with the metric each paper reports.
PAPER_TASKS = {"lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc", "arc_easy": "acc",
               "arc_challenge": "acc_norm", "winogrande": "acc"}
ALIASES = {"paper": tuple(PAPER_TASKS)}
# lm-eval tasks whose data the data directory holds: task -> (its YAML inside lm-eval, the file in the data directory)
DATA_DIRECTORY_TASKS = {"lambada_openai": ("lambada/lambada_openai.yaml", "lambada/lambada_test.jsonl")}
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_YAML_BYTES = 1 << 20
MAX_YAML_ALIASES = 256
MAX_INCLUDE_DEPTH = 8
SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")
FEWSHOT_SEED = 1234  # lm-eval's default


@dataclass
class LMEvalConfig:
    """What to run through lm-eval: task names or YAML files ("paper": the paper's six), few-shot examples (None:
    each task's default, 0 for most), the first `limit` documents only (a quick look), local data per task,
    folders of task YAMLs."""

    tasks: str | list[str]
    num_fewshot: int | None = None
    limit: int | None = None
    data: dict = field(default_factory=dict)
    include: tuple = ()
    batch_size: int = 8
    trust_code: bool = False

    def __post_init__(self):
        if self.num_fewshot is not None and (isinstance(self.num_fewshot, bool) or self.num_fewshot < 0):
            raise InputError(f"num_fewshot must be 0 or more, got {self.num_fewshot}")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise InputError(f"limit must be a positive number of documents, got {self.limit}")
        if isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size}")
        if not isinstance(self.trust_code, bool):
            raise InputError(f"trust_code must be True or False, got {self.trust_code!r}")
        self.tasks = task_names(self.tasks)


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise InputError(f"lm-eval is not installed; install the extra: pip install -e \".[eval]\" "
                         f"(lm-eval=={LM_EVAL_VERSION})") from None
    if lm_eval.__version__ != LM_EVAL_VERSION:
        logging.getLogger(__name__).warning("lm-eval %s is installed; mambaquant is tested with %s",
                                            lm_eval.__version__, LM_EVAL_VERSION)
    return lm_eval


def task_names(tasks) -> list[str]:
    """A comma-separated string or a list of names, with "paper" standing for the paper's six tasks."""
    if not isinstance(tasks, str) and not (isinstance(tasks, (list, tuple)) and all(isinstance(t, str) for t in tasks)):
        raise InputError(f"lm-eval tasks must be a comma-separated string or a list of names, got {tasks!r}"[:300])
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [t.strip() for t in tasks]
    expanded = [alias for name in names if name for alias in ALIASES.get(name, (name,))]
    if not expanded:
        raise InputError("no lm-eval task given; expected a comma-separated list of task names or YAML files")
    return list(dict.fromkeys(expanded))


@contextmanager
def offline():
    """The Hugging Face hub and datasets offline while tasks load (these machines reach no hub: without this a
    missing dataset costs half a minute of retries), unless the environment sets HF_HUB_OFFLINE itself."""
    import os

    import datasets.config
    import huggingface_hub.constants

    if "HF_HUB_OFFLINE" in os.environ:
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


@lru_cache(maxsize=1)
def all_lm_eval_tasks():
    """lm-eval's full task index (about 15,000 names; it takes some seconds to build, so it is built only for a
    name found nowhere else)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


class NotTaskYaml(InputError):
    """A file that does not parse as a task YAML (in a folder of them, skipped as lm-eval's index skips it)."""


class CodeReference(str):
    """A `!function module.name` of a task YAML, read without importing anything."""


@dataclass
class TaskFile:
    """What reading a task YAML safely tells: the tasks (and groups and tags) it defines, the tasks a group of it
    lists, and the Python code it (or a file it includes) would import, each with the file that names it."""

    path: Path
    has_task: bool
    names: list[str]
    tags: list[str]
    members: list[str]
    code: list[tuple[Path, str]]


def trusted_code_file(path: Path) -> bool:
    """Code named by our own task files or by lm-eval's installed ones runs with the library itself."""
    import lm_eval.tasks

    return path.is_relative_to(TASKS_DIR) or path.is_relative_to(Path(lm_eval.tasks.__file__).parent.resolve())


def scan_yaml(path: Path, depth: int = 0, seen: tuple = ()) -> TaskFile:
    """A task YAML read as data: a regular file of at most MAX_YAML_BYTES, at most MAX_YAML_ALIASES aliases (no
    alias bomb), `!function` tags recorded and never imported, its `include`s followed with the same checks."""
    import yaml

    from ..inputs import read_bytes

    where = display(path)
    path = path.resolve()
    if path in seen or depth > MAX_INCLUDE_DEPTH:
        raise InputError(f"{where}: includes {'itself' if path in seen else f'more than {MAX_INCLUDE_DEPTH} deep'}; "
                         "expected an lm-eval task YAML with a finite include chain")
    text = read_bytes(path, "an lm-eval task YAML", MAX_YAML_BYTES)
    loader = type("TaskLoader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda load, node: CodeReference(load.construct_scalar(node)))
    try:
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
        if aliases > MAX_YAML_ALIASES:
            raise InputError(f"{where}: {aliases:,} YAML aliases; expected at most {MAX_YAML_ALIASES} in a task YAML")
        config = yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader with one data-only tag)
    except yaml.YAMLError as e:
        raise NotTaskYaml(f"{where}: not a readable lm-eval task YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(config, dict):
        raise NotTaskYaml(f"{where}: expected an lm-eval task YAML (a mapping), got {type(config).__name__}")
    code = [(path, str(value)) for value in leaves(config) if isinstance(value, CodeReference)]
    includes = config.get("include") or []
    for include in includes if isinstance(includes, list) else [includes]:
        if not isinstance(include, str):
            raise InputError(f"{where}: include {include!r}; expected the path of a task YAML")
        included = scan_yaml(path.parent / include, depth + 1, (*seen, path))
        code += included.code
    task, group, tag = config.get("task"), config.get("group"), config.get("tag") or []
    members = task if isinstance(task, list) else []
    names = [name for name in (task, group) if isinstance(name, str)]
    tags = [tag] if isinstance(tag, str) else [t for t in tag if isinstance(t, str)] if isinstance(tag, list) else []
    members = [m if isinstance(m, str) else m.get("task") for m in members if isinstance(m, (str, dict))]
    return TaskFile(path, "task" in config, names, tags, [m for m in members if isinstance(m, str)], code)


def leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item)
    else:
        yield value


def check_trusted(scanned: TaskFile, trust_code: bool) -> None:
    """Task files are code: one naming Python to import runs only with the user's consent (--trust-task-code),
    as transformers' trust_remote_code."""
    untrusted = [(file, name) for file, name in scanned.code if not trusted_code_file(file)]
    if untrusted and not trust_code:
        (file, name), more = untrusted[0], len(untrusted) - 1
        also = f" and {more} more" if more else ""
        raise InputError(f"{display(scanned.path)}: runs Python code (!function {name} in {display(file)}{also}); "
                         "expected a task YAML without code, or --trust-task-code (LMEvalConfig(trust_code=True)) if you "
                         "trust it")


def read_yaml(path: Path, trust_code: bool = False) -> dict:
    """A task YAML as lm-eval reads it (its `!function`s imported), after `scan_yaml`'s checks and, for code of
    the user's, their consent."""
    from lm_eval.tasks._yaml_loader import load_yaml

    scanned = scan_yaml(path)
    if not scanned.has_task:
        raise InputError(f"{display(path)}: expected an lm-eval task YAML with a 'task' key")
    check_trusted(scanned, trust_code)
    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as e:  # a missing module or function the YAML names: the user's file, told in one line
        raise InputError(f"{display(path)}: not a readable lm-eval task YAML ({type(e).__name__}: {e})") from None
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):  # relative data files are relative to the YAML, not to the working directory
        config["dataset_kwargs"]["data_files"] = {split: str((path.parent / f).resolve()) for split, f in files.items()}
    elif isinstance(files, str):
        config["dataset_kwargs"]["data_files"] = str((path.parent / files).resolve())
    return config


def user_task_files(include, shipped: set[str]) -> dict[str, list[TaskFile]]:
    """{task, group or tag name: the files defining it} over the folders of `include`, each walked with bounds
    (`inputs.walk`) and every YAML in it scanned (`scan_yaml`; one that is no task YAML is skipped, as lm-eval's
    index skips it). A name of a task we ship, or a name defined twice, is refused: a user task never silently
    replaces another."""
    from ..inputs import walk

    defined: dict[str, list[TaskFile]] = {}
    for folder in include:
        for path in walk(folder, "a folder of lm-eval task YAMLs", (".yaml",), "an lm-eval task YAML"):
            try:
                scanned = scan_yaml(path)
            except NotTaskYaml:
                continue
            for name in scanned.names:
                if name in shipped:
                    raise InputError(f"{display(path)}: defines task {name!r}, which mambaquant ships; expected "
                                     "another name for your task (user tasks never replace shipped ones)")
                if name in defined:
                    raise InputError(f"{display(path)}: defines {name!r}, which {display(defined[name][0].path)} "
                                     "defines too; expected one definition")
                defined[name] = [scanned]
            for tag in scanned.tags:
                defined.setdefault(tag, []).append(scanned)
    return defined


def files_of(name: str, defined: dict[str, list[TaskFile]], seen: set | None = None) -> list[TaskFile]:
    """The user's task files a name needs: its own, and those of the tasks its groups list."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    files = list(defined.get(name, []))
    for file in list(files):
        for member in file.members:
            files += files_of(member, defined, seen)
    return files


def point_at_file(config: dict, file: Path) -> dict:
    """`config` reading its evaluation split from a local file (checked: `check_data_file`) instead of its own
    dataset."""
    split = config.get("test_split") or config.get("validation_split") or "test"
    check_data_file(file, config)
    config = {key: value for key, value in config.items() if key != "custom_dataset"}
    return {**config, **{key: None for key in SPLITS}, "test_split": split, "dataset_name": None,
            "dataset_path": DATA_FORMATS[file.suffix.lower()],
            "dataset_kwargs": {"data_files": {split: str(file.resolve())}}}


def check_data_file(file: Path, config: dict) -> None:
    """A task data file the user names, read through once before lm-eval does: a regular, non-empty file of a
    format we read, every JSON line an object (a .jsonl), one list of objects (a .json), a header and rows (a
    .csv), and every document with the fields the task reads (`check_records`). One line naming the file
    otherwise: a user's file replaces ours or the run stops."""
    import csv

    from ..inputs import read_bytes, text_of

    if file.suffix.lower() not in DATA_FORMATS:
        raise InputError(f"{display(file)}: expected task data as {', '.join(DATA_FORMATS)}")
    data = read_bytes(file, "a task data file", copies=10)  # the text, its parsed records and lm-eval's copies
    if not data.strip():
        raise InputError(f"{display(file)}: empty; expected the task's documents")
    if file.suffix.lower() == ".parquet":
        return
    text = text_of(data, display(file), "task data")
    if file.suffix.lower() == ".jsonl":
        records = [parse_json(line, file, f"line {number}") for number, line in enumerate(text.splitlines(), 1)
                   if line.strip()]
        if not all(isinstance(record, dict) for record in records):
            number = next(i for i, record in enumerate(records) if not isinstance(record, dict))
            raise InputError(f"{display(file)}: document {number} is not a JSON object; expected one document (an "
                             "object of fields) per line")
    elif file.suffix.lower() == ".json":
        records = parse_json(text, file, "its content")
        if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
            raise InputError(f"{display(file)}: expected a JSON list of documents (objects of fields)")
    else:
        rows = list(csv.reader(text.splitlines()))
        if len(rows) < 2:
            raise InputError(f"{display(file)}: expected a header line and at least one document")
        records = [dict(zip(rows[0], row)) for row in rows[1:]]
    check_records(records, config, file)


def check_records(records: list[dict], config: dict, file: Path) -> None:
    """The fields a task reads by name (a doc_to_* that is a plain field name) in every document; a multiple-choice
    target that indexes or names one of the document's choices, where both are fields."""
    named = {key: value for key in ("doc_to_text", "doc_to_target", "doc_to_choice")
             if isinstance(value := config.get(key), str) and value.isidentifier()}
    for number, record in enumerate(records):
        missing = [f"{field_name!r} ({key})" for key, field_name in named.items() if field_name not in record]
        if missing:
            raise InputError(f"{display(file)}: document {number} has no field {', '.join(missing)}; its fields: "
                             f"{', '.join(map(repr, record)) or 'none'}")
        if config.get("output_type") == "multiple_choice" and {"doc_to_target", "doc_to_choice"} <= set(named):
            choices, target = record[named["doc_to_choice"]], record[named["doc_to_target"]]
            if isinstance(choices, list) and not valid_target(target, choices):
                raise InputError(f"{display(file)}: document {number}'s {named['doc_to_target']} {target!r} is "
                                 f"not one of its {len(choices)} choices; expected an index 0..{len(choices) - 1} "
                                 "or one of the choices")


def parse_json(text: str, file: Path, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{display(file)}: {where} is not JSON ({e.msg} at column {e.colno})") from None


def data_of(config: dict) -> str:
    """The data a task config reads, as a protocol line names it: its local files, else its dataset."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        return ", ".join(dict.fromkeys(map(str, files.values())))
    if files:
        return str(files)
    return " ".join(str(part) for part in (config.get("dataset_path"), config.get("dataset_name")) if part)


def lm_eval_task_yaml(name: str) -> Path:
    import lm_eval.tasks

    if name in DATA_DIRECTORY_TASKS:
        path = Path(lm_eval.tasks.__file__).parent / DATA_DIRECTORY_TASKS[name][0]
        if path.is_file():
            return path
    entry = all_lm_eval_tasks().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise InputError(f"lm-eval task {name!r} has no task YAML to point at local data; write one (docs/lm-eval.md)")
    return Path(entry.yaml_path)


def task_specs(names: list[str], data: dict | None, include, trust_code: bool = False
               ) -> tuple[list, list[str], object]:
    """What to load for each name: a config dict (shipped, the user's YAML or a task pointed at local data) or a
    name in lm-eval's index. Returns the specs, where each one's data comes from (a file or a dataset, named), and
    the task manager that can load them. Every user task file is read safely first (`scan_yaml`) and runs code
    only with `trust_code`; data the user names always replaces a task's own."""
    from lm_eval.tasks import TaskManager

    data = {task: Path(file) for task, file in (data or {}).items()}
    for task in data:
        if task not in names:
            raise InputError(f"data given for lm-eval task {task!r}, which is not among the tasks ({', '.join(names)})")
    shipped = {name for path in TASKS_DIR.glob("*.yaml") for name in scan_yaml(path).names}
    defined = user_task_files(include or (), shipped)
    local = TaskManager(include_path=[str(TASKS_DIR), *map(str, include or ())], include_defaults=False)
    specs, origins, manager = [], [], local
    for name in names:
        path = Path(name)
        if path.suffix in (".yaml", ".yml"):
            config = read_yaml(path, trust_code)
            config = point_at_file(config, data[name]) if name in data else config
            specs.append(config)
            origins.append(f"user task {display(path)}, data: {data_of(config)}")
        elif name in local.task_index:
            entry = local.task_index[name]
            for scanned in files_of(name, defined):
                check_trusted(scanned, trust_code)
            config = read_yaml(Path(entry.yaml_path), trust_code) if entry.yaml_path else None
            if name in data:
                if config is None or "group" in config:
                    raise InputError(f"--lm-eval-data {name}=...: {name} is a group of tasks; expected data for "
                                     "one task")
                config = point_at_file(config, data[name])
            specs.append(config or name)
            if name in data:
                origins.append(f"user data: {display(data[name])}")
            elif name in shipped:
                origins.append(f"shipped with mambaquant, data: {name}.jsonl")
            else:
                origins.append(f"user task {display(entry.yaml_path)}, data: {data_of(config or {})}")
        elif name in data:
            specs.append(point_at_file(read_yaml(lm_eval_task_yaml(name)), data[name]))
            origins.append(f"user data: {display(data[name])}")
        elif name in DATA_DIRECTORY_TASKS and (found := data_directory_file(name)) is not None:
            specs.append(point_at_file(read_yaml(lm_eval_task_yaml(name)), found))
            origins.append(f"data directory: {DATA_DIRECTORY_TASKS[name][1]}")
        else:
            manager = all_lm_eval_tasks()
            if name not in manager.task_index:
                close = difflib.get_close_matches(name, manager.all_tasks + local.all_tasks, n=5, cutoff=0.6)
                hint = f"; close ones: {', '.join(close)}" if close else ""
                raise InputError(f"unknown lm-eval task {name!r}{hint} (or give a task YAML file)")
            specs.append(name)
            origins.append("lm-eval's dataset")
    return specs, origins, manager


def data_directory_file(name: str) -> Path | None:
    data = shared_data_dir()
    file = data / DATA_DIRECTORY_TASKS[name][1] if data else None
    return file if file is not None and file.is_file() else None


def load_tasks(tasks, data: dict | None = None, include=(), num_fewshot: int | None = None,
               trust_code: bool = False) -> tuple[dict, dict]:
    """({task name: lm-eval Task}, {task name: where its data comes from}), every task's documents read (locally)
    and checked (`check_documents`), and its few-shot examples set (`set_fewshot`). `data` maps a task to a local
    file for its evaluation split; `include` adds folders of task YAMLs; `trust_code` lets the user's task files
    import the Python they name."""
    require_lm_eval()
    names = task_names(tasks)
    specs, origins, manager = task_specs(names, data, include, trust_code)
    loaded, where = {}, {}
    with offline(), quiet():
        for name, spec, origin in zip(names, specs, origins):
            try:
                built = manager.load([spec])["tasks"]
            except InputError:
                raise
            except Exception as e:  # datasets and lm-eval raise many types for unreachable or malformed data
                problem = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                if origin.startswith("user"):
                    raise InputError(f"lm-eval task {name}: its data cannot be read ({origin}; {problem})") from None
                source = spec.get("dataset_path") if isinstance(spec, dict) else None
                if source is None and name in manager.task_index and manager.task_index[name].yaml_path:
                    source = read_yaml(Path(manager.task_index[name].yaml_path)).get("dataset_path")
                raise InputError(
                    f"lm-eval task {name}: its data ({source or 'unknown'}) cannot be read here ({problem}); give a "
                    f"local copy: --lm-eval-data {name}=FILE.jsonl with the dataset's fields, or a task YAML over "
                    "local files (docs/lm-eval.md)") from None
            loaded.update(built)
            where.update(dict.fromkeys(built, origin))
    for name, task in loaded.items():
        check_documents(name, task, where[name])
        set_fewshot(name, task, num_fewshot)
    return loaded, where


def check_documents(name: str, task, origin: str) -> None:
    """Every evaluation document of a task gives what the task reads from it: the fields its doc_to_* name exist
    (lm-eval would read a missing field's name as a template and evaluate that text), its text and target
    build, and a multiple-choice target is one of the document's choices. One line naming the data and the
    first bad document otherwise."""
    documents = list(task.eval_docs)
    if not documents:
        raise InputError(f"lm-eval task {name}: no documents in its evaluation split ({origin}); expected at least "
                         "one")
    features = set(getattr(task, "features", None) or documents[0].keys())
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        field_name = getattr(task.config, key, None)
        if isinstance(field_name, str) and field_name.isidentifier() and field_name not in features:
            raise InputError(f"lm-eval task {name}: its {key} reads field {field_name!r}, which its documents do not "
                             f"have ({origin}; fields: {', '.join(sorted(features))}); expected that field")
    multiple_choice = task.get_config("output_type") == "multiple_choice"
    for number, document in enumerate(documents):
        try:
            task.doc_to_text(document)
            target = task.doc_to_target(document)
            choices = task.doc_to_choice(document) if multiple_choice else None
        except Exception as e:  # the user's documents meet the task's templates and functions
            raise InputError(f"lm-eval task {name}: document {number} cannot be read ({origin}; "
                             f"{type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        if choices is not None and not valid_target(target, choices):
            raise InputError(f"lm-eval task {name}: document {number}'s target {target!r} is not one of its "
                             f"{len(choices)} choices ({origin}); expected an index 0..{len(choices) - 1} or a "
                             "choice")


def valid_target(target, choices) -> bool:
    targets = target if isinstance(target, list) else [target]
    return bool(targets) and all(
        (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(choices)) or (isinstance(t, str)
                                                                                       and t in choices)
        for t in targets)


def set_fewshot(name: str, task, num_fewshot: int | None) -> None:
    """Few-shot examples by lm-eval's rules (a task configured 0-shot stays so; None: the task's default, else 0),
    refused beyond what the task's few-shot documents hold (lm-eval itself would fail in random.sample, at the first
    document, after the model has loaded)."""
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    shots = task.get_config("num_fewshot")
    if shots:
        sampler = getattr(task, "sampler", None)  # lm-eval makes one only for a task with few-shot documents
        documents = len(sampler.fewshot_docs()) if sampler is not None else 0
        # drawn from the evaluation split itself, a document's examples leave the document out
        fewshot_split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
        usable = documents - int(fewshot_split is not None and fewshot_split == task.get_config("test_split"))
        if shots > usable:
            raise InputError(f"lm-eval task {name}: {shots} few-shot examples asked for, but its few-shot split has "
                             f"{documents} documents; expected --num-fewshot {max(usable, 0)} or fewer")


@contextmanager
def quiet():
    """lm-eval's and datasets' informational logging and progress bars held back: our commands print their own."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [logger.level for logger in loggers]
    bars = datasets.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def make_shakespeare_mc(documents: int = 200, choices: int = 4, context: int = 200, span: int = 30,
                        seed: int = 0) -> list[dict]:
    """A multiple-choice task on the Tiny Shakespeare validation split (the last 10 %, never trained on): `context`
    bytes cut at a random place (often inside a word), the true next `span` bytes among `choices` spans of the
    same length from elsewhere in the split. The gold answer's place cycles through the choices, so a model
    without preference scores exactly chance."""
    text = tinyshakespeare_validation().decode("ascii")  # the split is plain ASCII: bytes and characters agree
    rng = random.Random(seed)
    ends = sorted(rng.sample(range(context, len(text) - span), documents))
    docs = []
    for number, end in enumerate(ends):
        gold = text[end : end + span]
        distractors = []
        while len(distractors) < choices - 1:
            start = rng.randrange(0, len(text) - span)
            if abs(start - end) > 2 * context and text[start : start + span] not in (gold, *distractors):
                distractors.append(text[start : start + span])
        label = number % choices
        docs.append({"context": text[end - context : end], "label": label,
                     "choices": distractors[:label] + [gold] + distractors[label:]})
    return docs


if __name__ == "__main__":
    target = TASKS_DIR / "shakespeare_mc.jsonl"
    target.write_text("".join(json.dumps(doc) + "\n" for doc in make_shakespeare_mc()), encoding="utf-8")
    print(f"wrote {target}")
