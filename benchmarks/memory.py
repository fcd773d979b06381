"""Memory: a worker process's RSS idle, with runs in flight, and per run.

    .venv/bin/python -m benchmarks.memory [--limits 32,256] [--churn 1500] [--rounds 3]

For each limit, a fresh worker process (`python -m mq_worker start`): RSS once it is idle,
then with `limit` runs in flight (the probe, sleeping; stream_output false, then true), after
they are cancelled, and after `churn` short runs (/bin/true). Per-run overhead = (RSS with
the runs in flight - RSS idle before them) / runs. RSS after each round of short runs shows
whether memory keeps growing with the number of runs done. The guardian process (a separate small
interpreter that every worker starts) is reported apart. For reference: the RSS of an
interpreter that only imports the worker's main dependencies, and one that imports mq_worker.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import (
    FAILURES,
    PYTHON,
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_SUBMITTED,
    WORKER_STARTED,
    EventWatch,
    ProbeLog,
    Publisher,
    WorkerProcess,
    command_line,
    new_id,
    print_table,
    probe_command,
    run_benchmark,
    run_body,
    vhost,
    wait_for_quiet,
    wait_workers_started,
    workers,
)

MIB = 1024 * 1024
IMPORTS = {
    "python -c 'import aio_pika, anyio, pydantic, orjson, structlog'":
        "import aio_pika, anyio, pydantic, orjson, structlog",
    "python -c 'import mq_worker'": "import mq_worker",
    "python -c 'import mq_worker.cli, mq_worker.workers.process, uvloop'":
        "import mq_worker.cli, mq_worker.workers.process, uvloop",
}


def import_rss(statement: str) -> int:
    code = f"{statement}\nimport psutil\nprint(psutil.Process().memory_info().rss)"
    out = subprocess.run([PYTHON, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def guardian_rss(worker: WorkerProcess) -> int:
    total = 0
    for child in worker.process.children():
        try:
            if any("_guardian" in part for part in child.cmdline()):
                total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


async def settle() -> None:
    await asyncio.sleep(1.5)


async def measure_limit(limit: int, churn: int, rounds: int, loop: str = "auto"
                        ) -> dict[str, Any]:
    probe = probe_command()
    samples: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="mqw-memory-") as tmp, vhost(f"mem-{limit}") as host:
        log = ProbeLog(Path(tmp) / "probe.log")
        command = f"{probe} {log.path} 300"
        types = [WORKER_STARTED, RUN_SUBMITTED, RUN_CANCELLED, RUN_COMPLETED, *FAILURES]
        async with EventWatch(host.url, types) as watch, Publisher(host.url) as publisher:
            with workers(host.url, 1, limit=limit, prefix=f"mem-{limit}",
                         loop=loop) as started:
                worker = started[0]
                await wait_workers_started(watch, [worker.name], started)
                await asyncio.sleep(3)
                samples["idle"] = worker.rss_bytes()
                samples["guardian"] = guardian_rss(worker)
                for stream in (False, True):
                    label = "streaming" if stream else "no_stream"
                    samples[f"idle_before_{label}"] = worker.rss_bytes()
                    ids = [new_id() for _ in range(limit)]
                    await publisher.publish_many(
                        run_body(i, command, stream_output=stream) for i in ids)
                    for run_id in ids:
                        await log.wait_started(run_id, timeout=60)
                        await watch.wait_for(RUN_SUBMITTED, run_id, timeout=60)
                    await settle()
                    samples[f"in_flight_{label}"] = worker.rss_bytes()
                    for run_id in ids:
                        await publisher.cancel(run_id)
                    for run_id in ids:
                        await watch.wait_for(RUN_CANCELLED, run_id, timeout=60)
                    await settle()
                    samples[f"after_{label}"] = worker.rss_bytes()
                for round_ in range(1, rounds + 1 if churn else 1):
                    before = watch.counts[RUN_COMPLETED]
                    await publisher.publish_many(
                        run_body(new_id(), "/bin/true") for _ in range(churn))
                    await watch.wait_count(RUN_COMPLETED, before + churn, 60 + churn / 20,
                                           worker.check_alive)
                    await settle()
                    samples[f"after_churn_{round_}"] = worker.rss_bytes()
                failures = sum(watch.counts[t] for t in FAILURES)
    per_run = {
        label: (samples[f"in_flight_{label}"] - samples[f"idle_before_{label}"]) / limit
        for label in ("no_stream", "streaming")
    }
    return {"limit": limit, "churn": churn, "rounds": rounds, "failures": failures,
            "rss_bytes": samples,
            "per_run_bytes": {k: round(v) for k, v in per_run.items()}}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    background = wait_for_quiet(timeout=args.quiet)
    references = {label: import_rss(statement) for label, statement in IMPORTS.items()}
    limits = [await measure_limit(limit, args.churn, args.rounds, args.loop)
              for limit in args.limits]
    return {"references": references, "limits": limits, "loop": args.loop,
            "background_cores_before": background}


def report(result: dict[str, Any]) -> None:
    rows: list[list[Any]] = [[label, round(rss / MIB, 1)]
                             for label, rss in result["references"].items()]
    for entry in result["limits"]:
        s, limit = entry["rss_bytes"], entry["limit"]
        rows += [
            [f"worker (limit {limit}), idle", round(s["idle"] / MIB, 1)],
            ["its guardian process, idle", round(s["guardian"] / MIB, 1)],
            [f"worker, {limit} runs in flight (stream_output false)",
             round(s["in_flight_no_stream"] / MIB, 1)],
            [f"worker, {limit} runs in flight (stream_output true)",
             round(s["in_flight_streaming"] / MIB, 1)],
            ["worker, after those runs were cancelled", round(s["after_streaming"] / MIB, 1)],
        ]
        for round_ in range(1, entry["rounds"] + 1):
            if f"after_churn_{round_}" in s:
                rows.append([f"worker, after {round_ * entry['churn']:,} more runs of /bin/true",
                             round(s[f"after_churn_{round_}"] / MIB, 1)])
    print_table("memory (RSS, MiB)", ["process", "RSS MiB"], rows)
    print_table("per run in flight (KiB)",
                ["limit", "stream_output false", "stream_output true"],
                [[e["limit"], round(e["per_run_bytes"]["no_stream"] / 1024, 1),
                  round(e["per_run_bytes"]["streaming"] / 1024, 1)] for e in result["limits"]])


def parse_args() -> argparse.Namespace:
    parser = command_line(__doc__, quiet=30.0, loop=True)
    parser.add_argument("--limits", default="32,256")
    parser.add_argument("--churn", type=int, default=1500,
                        help="short runs (/bin/true) per round after the others")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of short runs")
    args = parser.parse_args()
    args.limits = [int(x) for x in args.limits.split(",")]
    return args


def main() -> None:
    run_benchmark("memory", parse_args(), main_async, report)


if __name__ == "__main__":
    main()
