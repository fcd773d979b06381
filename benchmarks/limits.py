"""Shared limits: what taking and giving back slot tokens adds to a run's start.

    .venv/bin/python -m benchmarks.limits [--runs 300] [--block 10] [--pace 25]
        [--tree before=/tmp/before --tree after=. [--rounds 3]]

One worker process (`--limit 8`). `mq-worker limit set` puts a limit of 1,000 on
`key:bench` and on `key:tag:bench` (never reached: no run waits). Runs are published
one at a time with plain aio-pika, in blocks of `--block` runs of one kind, the
three kinds taking turns so that load drifts hit them alike:

* unlimited: a run no limit applies to;
* one limit: a run with `concurrency_key: bench`;
* two limits: the same, tagged `bench` (its tag's limit too).

Two modes. Back to back (the default): the next run is published as soon as the
last one's `submitted` arrives, while that run is still running, so a limited run
always takes a token from the broker. Paced (`--pace RATE`, runs per second): runs
are published on a fixed beat, each once the one before has ended (its `completed`;
a run published late for that is counted), the steady state of a key whose runs do
not overlap: the slot of the run that ended is this worker's spare for the next
(see docs/pools.md, spare slots), where a limit's cost is smallest.

Per run: publish -> the worker's `submitted` event (by the event's own time); the
cost of a limit is the difference of the medians. Per block: the CPU time the worker
process spent from the first publish to the last `submitted` (the runs themselves are
other processes), divided by the runs of the block; steadier than wall time on a
loaded machine, and it counts what the worker does after a run ends (giving tokens
back) as long as the next run of the block follows.

`--tree NAME=DIR` (repeated) runs the worker from the mq_worker package of each
checkout in turn, `--rounds` times (A B A B ...): each tree in a vhost of its own,
each round a worker of its own and `--runs / --rounds` runs of each kind. On a shared
machine, only figures measured side by side compare. The load average is printed
before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks._amqp import (
    RUN_COMPLETED,
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
LIMIT = 1000  # never reached: no run waits
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


Samples = dict[str, tuple[list[float], list[float]]]  # kind: (latencies, CPU per run)


class Beat:
    """When to publish the next run: at once (back to back), or on a fixed beat once the
    last run has ended (paced); counts the runs published late because it had not."""

    def __init__(self, pace: float) -> None:
        self.interval = 1.0 / pace if pace else 0.0
        self.late = 0
        self._next = 0.0

    async def next(self, watch: EventWatch, last_run: str | None) -> None:
        if not self.interval:
            return
        if last_run is not None:
            await watch.wait_for(RUN_COMPLETED, last_run)
        now = time.monotonic()
        if self._next and now > self._next:
            self.late += 1
        await asyncio.sleep(max(0.0, self._next - now))
        self._next = max(now, self._next) + self.interval


async def measure(url: str, runs: int, block: int, tree: Path, samples: Samples,
                  beat: Beat) -> None:
    """Add to `samples` what `runs` runs of each kind cost with the worker of `tree`."""
    command = probe_command() + " /dev/null"
    async with EventWatch(url, [RUN_SUBMITTED, RUN_COMPLETED, WORKER_STARTED]) as watch, \
            Publisher(url) as publisher:
        worker = WorkerProcess(url, limit=8, name="limits-bench", tree=tree).start()
        try:
            await wait_workers_started(watch, [worker.name], [worker])
            assert worker.popen is not None
            pid = worker.popen.pid
            blocks = -(-runs // block) + WARM_UP_BLOCKS
            for index in range(blocks * len(KINDS)):
                kind = KINDS[index % len(KINDS)]
                before = cpu_ns(pid)
                block_latencies = await run_block(watch, publisher, command, kind, block,
                                                  beat)
                if index >= WARM_UP_BLOCKS * len(KINDS):
                    samples[kind][0].extend(block_latencies)
                    samples[kind][1].append((cpu_ns(pid) - before) / block / 1e6)
        finally:
            worker.stop()


async def run_block(watch: EventWatch, publisher: Publisher, command: str, kind: str,
                    runs: int, beat: Beat) -> list[float]:
    seen_after = []
    run_id = None
    for _ in range(runs):
        await beat.next(watch, run_id)
        run_id = new_id()
        published = await publisher.publish(body(run_id, command, kind),
                                            routing_key="run.scheduled.default.default")
        seen = await watch.wait_for(RUN_SUBMITTED, run_id)
        seen_after.append(seen.produced - published)
    return seen_after


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def summary(samples: Samples) -> dict[str, Any]:
    results = {kind: {**summarize_ms(latencies),
                      "cpu_ms_per_run": round(statistics.median(cpu), 3),
                      "cpu_blocks": [round(c, 3) for c in cpu]}
               for kind, (latencies, cpu) in samples.items()}
    base = results["unlimited"]
    return {
        "latency_ms": results,
        "added_p50_ms": {k: r["p50"] - base["p50"] for k, r in results.items()},
        "added_cpu_ms_per_run": {k: r["cpu_ms_per_run"] - base["cpu_ms_per_run"]
                                 for k, r in results.items()},
    }


async def measure_limits(args: argparse.Namespace) -> dict[str, Any]:
    trees: dict[str, Path] = args.trees
    rounds = args.rounds if args.tree else 1
    samples: dict[str, Samples] = {name: {kind: ([], []) for kind in KINDS} for name in trees}
    beat = Beat(args.pace)
    load_before = load_average()
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(vhost("limits")).url for name in trees}
        for url in urls.values():
            cli(url, "limit", "set", "key:bench", str(LIMIT))
            cli(url, "limit", "set", "key:tag:bench", str(LIMIT))
        for _ in range(rounds):
            for name, tree in trees.items():
                await measure(urls[name], -(-args.runs // rounds), args.block, tree,
                              samples[name], beat)
    return {"mode": f"paced, {args.pace:g} runs/s" if args.pace else "back to back",
            "late_runs": beat.late,
            "trees": {name: {"directory": str(trees[name]), **summary(samples[name])}
                      for name in trees},
            "load_average": {"before": load_before, "after": load_average()}}


def report(result: dict[str, Any]) -> None:
    for name, measured in result["trees"].items():
        results = measured["latency_ms"]
        base = results["unlimited"]
        rows = [[kind, r["n"], r["p50"], r["p90"], r["p99"], r["p50"] - base["p50"],
                 r["cpu_ms_per_run"], round(r["cpu_ms_per_run"] - base["cpu_ms_per_run"], 3)]
                for kind, r in results.items()]
        print_table(f"{name + ': ' if name else ''}{result['mode']}: publish -> submitted "
                    "(ms); worker CPU per run (ms, median of blocks)",
                    ["runs", "n", "p50", "p90", "p99", "added at p50", "CPU/run", "CPU added"],
                    rows)
    if result["mode"] != "back to back":
        print(f"runs published late (the run before had not ended on the beat): "
              f"{result['late_runs']}")
    load = result["load_average"]
    print(f"load average (1, 5, 15 min): before {load['before']}, after {load['after']}")


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--runs", type=int, default=300, help="Runs of each kind.")
    parser.add_argument("--block", type=int, default=10,
                        help="Runs of one kind in a row (one CPU sample).")
    parser.add_argument("--pace", type=float, default=0.0, metavar="RATE",
                        help="Runs per second, each published once the one before has "
                             "ended (0: back to back, each once the last has started).")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="Measure the worker of this checkout (repeat to compare).")
    parser.add_argument("--rounds", type=int, default=3,
                        help="With --tree: rounds, each tree in turn.")
    args = parser.parse_args()
    args.trees = {name: Path(directory).resolve()
                  for name, _, directory in (t.partition("=") for t in args.tree)} or {"": ROOT}
    run_benchmark("limits", args, measure_limits, report)


if __name__ == "__main__":
    main()
