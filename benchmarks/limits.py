"""Shared limits: what taking and giving back slot tokens adds to a run's start.

    .venv/bin/python -m benchmarks.limits [--runs 300] [--block 10]

One worker process (`--limit 8`). `mq-worker limit set` puts a limit of 10,000 on
`key:bench` and on `key:tag:bench` (never reached: no run waits). Runs are published
one at a time with plain aio-pika, in blocks of `--block` runs of one kind, the
three kinds taking turns so that load drifts hit them alike:

* unlimited: a run no limit applies to;
* one limit: a run with `concurrency_key: bench`;
* two limits: the same, tagged `bench` (its tag's limit too).

Per run: publish -> the worker's `submitted` event (by the event's own time); the
cost of a limit is the difference of the medians. Per block: the CPU time the worker
process spent from the first publish to the last `submitted` (the runs themselves are
other processes), divided by the runs of the block; steadier than wall time on a
loaded machine, and it counts what the worker does after a run ends (giving tokens
back) as long as the next run of the block follows.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from pathlib import Path
from typing import Any

import orjson

from benchmarks._amqp import (
    RUN_SUBMITTED,
    WORKER_STARTED,
    EventWatch,
    Publisher,
    new_id,
    wait_workers_started,
)
from benchmarks._broker import vhost
from benchmarks._paths import PYTHON, ROOT
from benchmarks._probe import probe_command
from benchmarks._report import print_table, summarize_ms
from benchmarks._runner import command_line, run_benchmark
from benchmarks._workers import WorkerProcess

KINDS = ("unlimited", "one limit", "two limits")
WARM_UP_BLOCKS = 1


def cpu_ns(pid: int) -> int:
    """Nanoseconds the process's threads have spent on a CPU (the scheduler's own count,
    finer than the 10 ms ticks of /proc/<pid>/stat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total


def cli(url: str, *args: str) -> None:
    subprocess.run([PYTHON, "-m", "mq_worker", *args, "--url", url], check=True, cwd=ROOT,
                   capture_output=True)


def body(run_id: str, command: str, kind: str) -> bytes:
    run: dict[str, Any] = {"id": run_id,
                           "job_variables": {"command": command, "stream_output": False}}
    if kind != "unlimited":
        run["concurrency_key"] = "bench"
    if kind == "two limits":
        run["tags"] = ["bench"]
    return orjson.dumps(run)


async def measure(url: str, runs: int, block: int) -> dict[str, dict[str, Any]]:
    command = probe_command() + " /dev/null"
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cpu_per_run: dict[str, list[float]] = {kind: [] for kind in KINDS}
    async with EventWatch(url, [RUN_SUBMITTED, WORKER_STARTED]) as watch, \
            Publisher(url) as publisher:
        worker = WorkerProcess(url, limit=8, name="limits-bench").start()
        try:
            await wait_workers_started(watch, [worker.name], [worker])
            assert worker.popen is not None
            pid = worker.popen.pid
            blocks = -(-runs // block) + WARM_UP_BLOCKS
            for index in range(blocks * len(KINDS)):
                kind = KINDS[index % len(KINDS)]
                before = cpu_ns(pid)
                block_latencies = await run_block(watch, publisher, command, kind, block)
                if index >= WARM_UP_BLOCKS * len(KINDS):
                    latencies[kind].extend(block_latencies)
                    cpu_per_run[kind].append((cpu_ns(pid) - before) / block / 1e6)
        finally:
            worker.stop()
    return {kind: {**summarize_ms(latencies[kind]),
                   "cpu_ms_per_run": round(statistics.median(cpu_per_run[kind]), 3),
                   "cpu_blocks": [round(c, 3) for c in cpu_per_run[kind]]}
            for kind in KINDS}


async def run_block(watch: EventWatch, publisher: Publisher, command: str, kind: str,
                    runs: int) -> list[float]:
    seen_after = []
    for _ in range(runs):
        run_id = new_id()
        published = await publisher.publish(body(run_id, command, kind),
                                            routing_key="run.scheduled.default.default")
        seen = await watch.wait_for(RUN_SUBMITTED, run_id)
        seen_after.append(seen.produced - published)
    return seen_after


async def measure_limits(args: argparse.Namespace) -> dict[str, Any]:
    with vhost("limits") as host:
        cli(host.url, "limit", "set", "key:bench", "10000")
        cli(host.url, "limit", "set", "key:tag:bench", "10000")
        results = await measure(host.url, args.runs, args.block)
    base = results["unlimited"]
    return {
        "latency_ms": results,
        "added_p50_ms": {k: r["p50"] - base["p50"] for k, r in results.items()},
        "added_cpu_ms_per_run": {k: r["cpu_ms_per_run"] - base["cpu_ms_per_run"]
                                 for k, r in results.items()},
    }


def report(result: dict[str, Any]) -> None:
    results = result["latency_ms"]
    base = results["unlimited"]
    rows = [[kind, r["n"], r["p50"], r["p90"], r["p99"], r["p50"] - base["p50"],
             r["cpu_ms_per_run"], round(r["cpu_ms_per_run"] - base["cpu_ms_per_run"], 3)]
            for kind, r in results.items()]
    print_table("publish -> submitted (ms); worker CPU per run (ms, median of blocks)",
                ["runs", "n", "p50", "p90", "p99", "added at p50", "CPU/run", "CPU added"],
                rows)


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--runs", type=int, default=300, help="Runs of each kind.")
    parser.add_argument("--block", type=int, default=10,
                        help="Runs of one kind in a row (one CPU sample).")
    run_benchmark("limits", parser.parse_args(), measure_limits, report)


if __name__ == "__main__":
    main()
