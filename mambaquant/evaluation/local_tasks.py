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

LM_EVAL_VERSION = "0.4.13"
TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
# The zero-shot tasks of the MambaQuant and Quamba papers, with the metric each paper reports.
PAPER_TASKS = {"lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc", "arc_easy": "acc",
               "arc_challenge": "acc_norm", "winogrande": "acc"}
ALIASES = {"paper": tuple(PAPER_TASKS)}
# lm-eval tasks whose data the data directory holds: task -> (its YAML inside lm-eval, the file in the data directory)
DATA_DIRECTORY_TASKS = {"lambada_openai": ("lambada/lambada_openai.yaml", "lambada/lambada_test.jsonl")}
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
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

    def __post_init__(self):
        if self.num_fewshot is not None and (isinstance(self.num_fewshot, bool) or self.num_fewshot < 0):
            raise InputError(f"num_fewshot must be 0 or more, got {self.num_fewshot}")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise InputError(f"limit must be a positive number of documents, got {self.limit}")
        if isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size}")
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
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
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


def read_yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as e:  # a YAML error, a missing include or !function: the user's file, told in one line
        raise InputError(f"{path}: not a readable lm-eval task YAML ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or "task" not in config:
        raise InputError(f"{path}: expected an lm-eval task YAML with a 'task' key")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):  # relative data files are relative to the YAML, not to the working directory
        config["dataset_kwargs"]["data_files"] = {split: str((path.parent / f).resolve()) for split, f in files.items()}
    elif isinstance(files, str):
        config["dataset_kwargs"]["data_files"] = str((path.parent / files).resolve())
    return config


def point_at_file(config: dict, file: Path) -> dict:
    """`config` reading its evaluation split from a local file instead of its hub dataset."""
    split = config.get("test_split") or config.get("validation_split")
    if file.suffix not in DATA_FORMATS:
        raise InputError(f"{file}: expected task data as {', '.join(DATA_FORMATS)}")
    if not file.is_file():
        raise InputError(f"{file}: task data file not found")
    config = {**config, **{key: None for key in SPLITS}, "test_split": split, "dataset_name": None,
              "dataset_path": DATA_FORMATS[file.suffix], "dataset_kwargs": {"data_files": {split: str(file.resolve())}}}
    return config


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


def task_specs(names: list[str], data: dict | None, include) -> tuple[list, list[str], object]:
    """What to load for each name: a config dict (shipped, the user's YAML or a task pointed at local data) or a
    name in lm-eval's index. Returns the specs, where each one's data comes from, and the task manager that can
    load them."""
    from lm_eval.tasks import TaskManager

    data = {task: Path(file) for task, file in (data or {}).items()}
    for task in data:
        if task not in names:
            raise InputError(f"data given for lm-eval task {task!r}, which is not among the tasks ({', '.join(names)})")
    include = [Path(p) for p in include or ()]
    for folder in include:
        if not folder.is_dir():
            raise InputError(f"{folder}: lm-eval task folder not found")
    local = TaskManager(include_path=[str(TASKS_DIR), *map(str, include)], include_defaults=False)
    specs, origins, manager = [], [], local
    for name in names:
        path = Path(name)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise InputError(f"{path}: task YAML not found")
            config = read_yaml(path)
            specs.append(point_at_file(config, data[name]) if name in data else config)
            origins.append(f"user data: {data[name] if name in data else path}")
        elif name in local.task_index:
            entry = local.task_index[name]
            specs.append(read_yaml(Path(entry.yaml_path)) if entry.yaml_path else name)
            shipped = entry.yaml_path and Path(entry.yaml_path).parent == TASKS_DIR
            origins.append("shipped with mambaquant" if shipped else f"user data: {entry.yaml_path}")
        elif name in data:
            specs.append(point_at_file(read_yaml(lm_eval_task_yaml(name)), data[name]))
            origins.append(f"user data: {data[name]}")
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


def load_tasks(tasks, data: dict | None = None, include=(), num_fewshot: int | None = None) -> tuple[dict, dict]:
    """({task name: lm-eval Task}, {task name: where its data comes from}), every task's documents read (locally)
    and its few-shot examples set (`set_fewshot`). `data` maps a task to a local file for its evaluation split;
    `include` adds folders of task YAMLs."""
    require_lm_eval()
    names = task_names(tasks)
    specs, origins, manager = task_specs(names, data, include)
    loaded, where = {}, {}
    with offline(), quiet():
        for name, spec, origin in zip(names, specs, origins):
            try:
                built = manager.load([spec])["tasks"]
            except InputError:
                raise
            except Exception as e:  # datasets and lm-eval raise many types for unreachable or malformed data
                source = spec.get("dataset_path") if isinstance(spec, dict) else None
                if source is None and name in manager.task_index and manager.task_index[name].yaml_path:
                    source = read_yaml(Path(manager.task_index[name].yaml_path)).get("dataset_path")
                raise InputError(
                    f"lm-eval task {name}: its data ({source or 'unknown'}) cannot be read here "
                    f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); give a local copy: "
                    f"--lm-eval-data {name}=FILE.jsonl with the dataset's fields, or a task YAML over local files "
                    "(docs/lm-eval.md)") from None
            loaded.update(built)
            where.update(dict.fromkeys(built, origin))
    for name, task in loaded.items():
        set_fewshot(name, task, num_fewshot)
    return loaded, where


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
