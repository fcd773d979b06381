"""The system calls one run costs a worker: `strace -c` on a worker that runs pre-loaded runs.

    .venv/bin/python -m benchmarks.syscalls [--runs 1000] [--log-level WARNING]

A worker at limit 8 is started under `strace -c` (its own threads only, not the runs: no
-f) after `runs` runs of /bin/true were published; once the last `run.completed` arrives it
is stopped and strace's table is printed, divided by the number of runs. strace slows the
worker down a lot: the counts are what this measures, not the time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import (
    PYTHON,
    RESULTS,
    ROOT,
    RUN_COMPLETED,
    EventWatch,
    Publisher,
    command_line,
    new_id,
    print_table,
    run_benchmark,
    run_body,
    vhost,
)
from benchmarks.side_by_side import TRUE, declare

_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


async def measure(runs: int, log_level: str, tree: Path = ROOT) -> list[tuple[str, float]]:
    with vhost("syscalls") as host:
        await declare(host.url)
        async with EventWatch(host.url, [RUN_COMPLETED]) as watch, \
                Publisher(host.url) as publisher:
            await publisher.publish_many(run_body(new_id(), TRUE) for _ in range(runs))
            out = RESULTS / "syscalls.strace"
            RESULTS.mkdir(parents=True, exist_ok=True)
            worker = subprocess.Popen(  # noqa: ASYNC220 (started once, before measuring)
                ["strace", "-c", "-o", str(out), PYTHON, "-m", "mq_worker", "start",
                 "--url", host.url, "--limit", "8", "--name", "syscalls",
                 "--log-level", log_level, "--log-format", "json"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree,
                env={**os.environ, "PYTHONPATH": str(tree)})
            try:
                await watch.wait_count(RUN_COMPLETED, runs, 120 + runs / 5)
            finally:
                # strace does not pass signals on: stop the worker it traces.
                for traced in psutil.Process(worker.pid).children():
                    traced.send_signal(signal.SIGTERM)
                await asyncio.to_thread(worker.wait, 120)
    counts = []
    for line in out.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            counts.append((match.group(2), int(match.group(1)) / runs))
    return sorted(counts, key=lambda c: -c[1])


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="measure the mq_worker package of another checkout")
    args = parser.parse_args()

    async def measure_counts(args: argparse.Namespace) -> dict[str, Any]:
        return {"per_run": dict(await measure(args.runs, args.log_level, args.tree.resolve()))}

    def report(result: dict[str, Any]) -> None:
        print_table(f"system calls of the worker per run ({args.runs} runs, limit 8, "
                    f"log level {args.log_level}; start-up and stop included)",
                    ["system call", "per run"],
                    [[n, round(c, 2)] for n, c in result["per_run"].items() if c >= 0.05])

    run_benchmark("syscalls", args, measure_counts, report)


if __name__ == "__main__":
    main()
