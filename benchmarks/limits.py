"""Shared limits: what taking and giving back slot tokens adds to a run's start.

    .venv/bin/python -m benchmarks.limits [--runs 300]

One worker process (`--limit 8`). `mq-worker limit set` puts a limit of 10,000 on
`key:bench` and on `pool:limited` (never reached: no run waits). Runs are published
one at a time with plain aio-pika, alternating three kinds so that load drifts
hit them alike:

* unlimited: a run no limit applies to;
* one limit: a run with `concurrency_key: bench`;
* two limits: the same, published to pool `limited` (its pool limit too).

Per run: publish -> the worker's `submitted` event (by the event's own time).
The cost of a limit is the difference of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
from typing import Any

import orjson

from benchmarks.common import (
    PYTHON,
    ROOT,
    RUN_SUBMITTED,
    WORKER_STARTED,
    EventWatch,
    Publisher,
    WorkerProcess,
    banner,
    new_id,
    print_table,
    probe_command,
    summarize_ms,
    vhost,
    wait_workers_started,
    write_results,
)

KINDS = ("unlimited", "one limit", "two limits")


def cli(url: str, *args: str) -> None:
    subprocess.run([PYTHON, "-m", "mq_worker", *args, "--url", url], check=True, cwd=ROOT,
                   capture_output=True)


def body(run_id: str, command: str, kind: str) -> bytes:
    run: dict[str, Any] = {"id": run_id,
                           "job_variables": {"command": command, "stream_output": False}}
    if kind != "unlimited":
        run["concurrency_key"] = "bench"
    return orjson.dumps(run)


async def measure(url: str, runs: int) -> dict[str, dict[str, float]]:
    command = probe_command() + " /dev/null"
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    async with EventWatch(url, [RUN_SUBMITTED, WORKER_STARTED]) as watch, \
            Publisher(url) as publisher:
        workers = [WorkerProcess(url, limit=8, name="limits-default").start(),
                   WorkerProcess(url, limit=8, name="limits-limited",
                                 extra_args=["--pool", "limited"]).start()]
        try:
            await wait_workers_started(watch, [w.name for w in workers], workers)
            await run_all(watch, publisher, command, runs, latencies)
        finally:
            for worker in workers:
                worker.stop()
    return {kind: summarize_ms(values) for kind, values in latencies.items()}


async def run_all(watch: EventWatch, publisher: Publisher, command: str, runs: int,
                  latencies: dict[str, list[float]]) -> None:
    for index in range(runs * len(KINDS)):
            kind = KINDS[index % len(KINDS)]
            run_id = new_id()
            key = ("run.scheduled.limited.default" if kind == "two limits"
                   else "run.scheduled.default.default")
            published = await publisher.publish(body(run_id, command, kind), routing_key=key)
            seen = await watch.wait_for(RUN_SUBMITTED, run_id)
            if index >= len(KINDS) * 5:  # the first rounds warm up
                latencies[kind].append(seen.produced - published)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="Runs of each kind.")
    args = parser.parse_args()
    banner("limits")
    with vhost("limits") as host:
        cli(host.url, "limit", "set", "key:bench", "10000")
        cli(host.url, "limit", "set", "pool:limited", "10000")
        results = asyncio.run(measure(host.url, args.runs))
    base = results["unlimited"]["p50"]
    rows = [[kind, r["n"], r["p50"], r["p90"], r["p99"], r["p50"] - base]
            for kind, r in results.items()]
    print_table("publish -> submitted (ms)", ["runs", "n", "p50", "p90", "p99", "added at p50"],
                rows)
    write_results("limits", {"latency_ms": results,
                             "added_p50_ms": {k: r["p50"] - base for k, r in results.items()}})


if __name__ == "__main__":
    main()
