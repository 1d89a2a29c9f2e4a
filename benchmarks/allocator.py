"""Wall, user and system time and peak memory of CLI commands with glibc's malloc as mambaquant tunes it
(`mambaquant.allocator`) and as glibc ships it (MAMBAQUANT_MALLOC=default), side by side: each command runs
alternately in both settings, `--repeats` times, in fresh processes; the table gives each one's best wall time
with the user and system time of that run.

    python benchmarks/allocator.py [--repeats 2] [--markdown FILE] [-- COMMAND ARGS ...]

Default commands: `mambaquant eval vim-cifar10 --eval-samples 500` and `mambaquant quantize mamba-shakespeare
--method mambaquant --eval-samples 50` (both must print the same result in both settings: checked).
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

DEFAULT_COMMANDS = (("eval", "vim-cifar10", "--eval-samples", "500"),
                    ("quantize", "mamba-shakespeare", "--method", "mambaquant", "--eval-samples", "50"))
SETTINGS = {"tuned": {}, "glibc default": {"MAMBAQUANT_MALLOC": "default"}}


def run(command: tuple[str, ...], extra_env: dict) -> dict:
    """One fresh process; its own resource usage (os.wait4), so peak memory is this run's alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "mambaquant", *command], env={**env, **extra_env},
                                 stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode:
            raise SystemExit(f"{' '.join(command)} failed: {err.read().strip().splitlines()[-1:]}")
        return {"wall": wall, "user": usage.ru_utime, "system": usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024,
                "output": result_lines(out.read())}


def result_lines(stdout: str) -> list[str]:
    """What a command reports, without its timings."""
    return [line for line in stdout.splitlines() if "second" not in line and " s " not in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--markdown")
    parser.add_argument("command", nargs="*")
    args = parser.parse_args()
    commands = [tuple(args.command)] if args.command else list(DEFAULT_COMMANDS)
    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
             f"{platform.python_version()}", "",
             "| command | malloc | wall s | user s | system s | peak RSS MiB | wall vs default |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for command in commands:
        best = {}
        for _ in range(args.repeats):
            for name, extra_env in SETTINGS.items():
                result = run(command, extra_env)
                if name not in best or result["wall"] < best[name]["wall"]:
                    best[name] = result
        if best["tuned"]["output"] != best["glibc default"]["output"]:
            raise SystemExit(f"{' '.join(command)}: different results with the two allocators")
        default_wall = best["glibc default"]["wall"]
        for name, r in best.items():
            lines.append(f"| `mambaquant {' '.join(command)}` | {name} | {r['wall']:.1f} | {r['user']:.1f} | "
                         f"{r['system']:.1f} | {r['peak_mib']:.0f} | {default_wall / r['wall']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
