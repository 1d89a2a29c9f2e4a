"""Progress of long commands on stderr: a bar on a terminal, one plain line per finished step in a log."""

import sys
import time
from collections.abc import Callable, Iterable

from tqdm import tqdm


def progress(items: Iterable, desc: str, unit: str, enabled: bool = True, label: Callable | None = None) -> Iterable:
    """`items`, reporting each as it is done; `label(item)` names it in the plain lines."""
    if not enabled:
        return items
    if sys.stderr.isatty():
        return tqdm(items, desc=desc, unit=unit, leave=False)
    return plain_lines(list(items), desc, unit, label)


def plain_lines(items: list, desc: str, unit: str, label: Callable | None):
    started = time.perf_counter()
    for index, item in enumerate(items, 1):
        yield item
        name = f" ({label(item)})" if label else ""
        print(f"{desc}: {unit} {index}/{len(items)} done{name}, {time.perf_counter() - started:.1f} s",
              file=sys.stderr, flush=True)
