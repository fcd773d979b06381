"""How long the `mq-worker` client commands take, wall clock, as a user runs them.

`--version` is the floor (interpreter start and imports); `status` returns once the
workers' answers stop coming rather than after its whole `--listen`; `submit --wait`
is a full round trip of a /bin/true run; `cancel --wait` of a run no worker holds
returns after `--listen`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PYTHON,
    command_line,
    print_table,
    run_benchmark,
    vhost,
    wait_for_quiet,
    workers,
)

_SCRIPT = Path(PYTHON).parent / "mq-worker"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [PYTHON, "-m", "mq_worker"]


def timed(*args: str, expect: int) -> float:
    began = time.monotonic()
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - began
    if result.returncode != expect:
        raise RuntimeError(f"mq-worker {' '.join(args)} exited {result.returncode}: "
                           f"{result.stderr}")
    return elapsed


def wait_workers(url: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = subprocess.run([*CLI, "status", "--url", url, "--json"], capture_output=True,
                                text=True, timeout=60)
        if result.returncode == 0 and result.stdout.count('"state": "live"') >= count:
            return
    raise RuntimeError("the workers did not start")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, list[float]] = {}
    with vhost("cli") as space, workers(space.url, args.workers, limit=4, prefix="cli"):
        url = space.url
        wait_workers(url, args.workers)
        commands = {
            "--version": (["--version"], 0),
            f"status --listen {args.listen:g}": (
                ["status", "--url", url, "--listen", str(args.listen)], 0),
            "submit --wait -- true": (["submit", "--url", url, "--wait", "--", "true"], 0),
            "cancel --wait (run not held, --listen 2)": (
                ["cancel", str(uuid.uuid4()), "--url", url, "--wait", "--listen", "2"], 3),
        }
        for label, (command, code) in commands.items():
            rows[label] = [timed(*command, expect=code) for _ in range(args.repeat)]
    return {"workers": args.workers, "repeat": args.repeat,
            "seconds": {k: sorted(v) for k, v in rows.items()}}


def report(result: dict[str, Any]) -> None:
    print_table(
        f"client commands, wall clock ({result['workers']} workers, "
        f"{result['repeat']} times each)",
        ["command", "median s", "min s", "max s"],
        [[label, round(statistics.median(v), 3), round(v[0], 3), round(v[-1], 3)]
         for label, v in result["seconds"].items()],
    )


def parse_args() -> argparse.Namespace:
    parser = command_line(__doc__, quiet=60.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--listen", type=float, default=10.0)
    return parser.parse_args()


def main() -> None:
    run_benchmark("cli", parse_args(), measure_when_quiet, report)


def measure_when_quiet(args: argparse.Namespace) -> dict[str, Any]:
    return {"other_load_before": wait_for_quiet(timeout=args.quiet), **measure(args)}


if __name__ == "__main__":
    main()
