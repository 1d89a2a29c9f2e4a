"""The datasets of the tasks shipped with mambaquant, read from the files beside this module. (Through lm-eval's
`custom_dataset` hook: relative `data_files` in a task YAML would be read from the working directory.)"""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def shakespeare_mc(**task_metadata) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / "shakespeare_mc.jsonl"))})
