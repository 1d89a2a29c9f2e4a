"""What the engines' rule modules (`llama_cpp`, `vllm`) share: a walk over a quantized model (or block) collecting
what the engine does not execute, and those problems said in one line."""

import re
from collections import Counter
from collections.abc import Callable

from torch import nn


def module_problems(model: nn.Module, problems_of: Callable[[str, nn.Module], list[str]],
                    skip: str | None = None) -> list[str]:
    """`problems_of(name, module)` for every module of `model`, in order; modules under `skip` are left out."""
    return [problem for name, module in model.named_modules() if skip is None or not name.startswith(skip)
            for problem in problems_of(name, module)]


def summary(problems: list[str], shown: int = 4) -> str:
    """Problems as one line: those that differ only in the block index counted once ("... in layers.N.mixer x4"),
    the first `shown` kinds named and the rest counted."""
    kinds = Counter(re.sub(r"layers\.\d+\.", "layers.N.", problem) for problem in problems)
    named = [f"{kind} (x{count})" if count > 1 else kind for kind, count in list(kinds.items())[:shown]]
    rest = len(kinds) - shown
    return "; ".join(named) + (f"; and {rest} more" if rest > 0 else "")
