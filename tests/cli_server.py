"""A process that imports the CLI once and runs each requested command line in a forked child of itself, so that a
bad-input suite of hundreds of cases costs milliseconds a case instead of a Python and torch start-up each.

Each child is a real process running `mambaquant.cli.main(argv)` as `python -m mambaquant` would: its own stdout
and stderr (files), working directory, environment and exit status; an uncaught exception prints its traceback and
exits 1, as the interpreter does. This process never runs a torch computation itself, so forking is safe.

Protocol: one JSON request per line on stdin ({"argv", "cwd", "env", "umask", "stdout", "stderr", "timeout"}), one JSON reply
per line on stdout ({"code", "max_rss_kib", "timed_out"}).
"""

import json
import os
import signal
import sys
import time
import traceback

from mambaquant.cli import main


def run_child(request: dict) -> None:
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
    os.environ.update(request.get("env") or {})
    if request.get("umask") is not None:
        os.umask(request["umask"])
    os.chdir(request.get("cwd") or os.getcwd())
    sys.argv = ["mambaquant", *request["argv"]]
    try:
        code = main(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                run_child(request)
            finally:
                os._exit(70)
        deadline = time.monotonic() + request.get("timeout", 120)
        timed_out = False
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
                _, status, usage = os.wait4(pid, 0)
                break
            time.sleep(0.005)
        code = os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"code": code, "max_rss_kib": usage.ru_maxrss, "timed_out": timed_out}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
