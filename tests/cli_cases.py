"""Running the real CLI many times, fast (see cli_server.py), and the checks every failing command must pass."""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RSS_BOUND_MIB = 1536  # what a refused command may allocate beyond the server's own imports


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    rss_mib: float  # the child's peak resident memory beyond the server's at start
    timed_out: bool


class CliServer:
    def __init__(self):
        self.scratch = Path(tempfile.mkdtemp(prefix="mambaquant-cli-"))
        self.process = subprocess.Popen([sys.executable, "-m", "tests.cli_server"], cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        self.baseline_kib = self._request(["--version"], None, None, 60)["max_rss_kib"]
        self.exit_codes: list[int] = []  # of every command run, for the session's summary

    def _request(self, argv, cwd, env, timeout, umask=None) -> dict:
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd) if cwd else None, "env": env or {}, "umask": umask,
                   "stdout": str(self.scratch / "stdout"), "stderr": str(self.scratch / "stderr"), "timeout": timeout}
        self.process.stdin.write(json.dumps(request) + "\n")
        return json.loads(self.process.stdout.readline())

    def run(self, *argv, cwd=None, env=None, timeout=120, umask=None) -> Result:
        reply = self._request(argv, cwd, env, timeout, umask)
        self.exit_codes.append(reply["code"])
        read = lambda name: (self.scratch / name).read_text(errors="replace")  # noqa: E731
        return Result(reply["code"], read("stdout"), read("stderr"),
                      (reply["max_rss_kib"] - self.baseline_kib) / 1024, reply["timed_out"])

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)
        for name in ("stdout", "stderr"):
            (self.scratch / name).unlink(missing_ok=True)
        os.rmdir(self.scratch)


def assert_refused(result: Result, *words: str, code: int = 2) -> None:
    """Exit `code`, exactly one line on stderr that contains `words`, no traceback, bounded memory."""
    assert not result.timed_out, "the command did not finish"
    lines = result.stderr.strip().splitlines()
    assert result.code == code, f"exit {result.code}, expected {code}; stderr: {result.stderr[-2000:]}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert result.rss_mib < RSS_BOUND_MIB, f"allocated {result.rss_mib:.0f} MiB before refusing"


def assert_failed_after_progress(result: Result, *words: str, code: int = 2) -> None:
    """A failure that only the work itself could reveal: the progress lines of the work done, then one error line."""
    lines = result.stderr.strip().splitlines()
    assert lines and all(" done" in line for line in lines[:-1]), result.stderr[-2000:]
    assert_refused(Result(result.code, result.stdout, lines[-1], result.rss_mib, result.timed_out), *words, code=code)
