"""mambaquant tunes glibc's malloc at import (mambaquant/allocator.py), unless the user chose otherwise."""

import os
import subprocess
import sys

import pytest

PROBE = "import mambaquant.allocator as a; print(a.tune_allocator())"


def probe(**env) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MAMBAQUANT_MALLOC"}
    return subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_the_allocator_is_tuned_unless_the_user_chose_otherwise():
    assert probe() == "True"
    assert probe(MAMBAQUANT_MALLOC="default") == "False"
    assert probe(MALLOC_MMAP_THRESHOLD_="131072") == "False"  # glibc's own variables win
