"""lm-eval's own command line with the "mambaquant" model registered and the tasks shipped with mambaquant on its
task path (lm-eval 0.4 discovers no model plugins, so `lm_eval --model mambaquant` cannot find it):

    python -m mambaquant.harness --model mambaquant --model_args pretrained=DIR,backend=int8 --tasks TASKS"""

import sys

from .errors import InputError
from .evaluation.local_tasks import TASKS_DIR, require_lm_eval


def main() -> None:
    try:
        require_lm_eval()
    except InputError as e:
        sys.exit(f"mambaquant.harness: error: {e}")
    from lm_eval.__main__ import cli_evaluate

    from .evaluation import harness  # noqa: F401  registers the model

    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
