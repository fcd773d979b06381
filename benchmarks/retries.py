"""Retries: how punctually a retried run's next attempt starts, and how fast a cancel ends a
run waiting for its next attempt.

    .venv/bin/python -m benchmarks.retries [--runs 20] [--delays 0,2,15] [--cancels 20]

One worker process (`python -m mq_worker start --limit 64`, default `--prefetch-seconds` 10).

* Punctuality: for each delay, `runs` runs of `false` with `retries: 1` and that
  `retry_delay_seconds`, published in one go. The next attempt is parked in the delay ladder
  by the worker; a delay of 0 goes straight through it, 2 s comes back at once and is held,
  15 s waits in the ladder. Lateness is the second attempt's `submitted` event `time` minus
  the `next_start_time` its `retrying` event announced (both from the worker's clock).
* Cancel during the wait: `cancels` runs of `false` with `retries: 1` and a 30 s delay; as
  soon as a run's `retrying` event is seen its cancel is published with plain aio-pika.
  Latency is the cancel's publish time to the `cancelled` event's arrival here. Once every
  next attempt is past due, the run must have had no second attempt and one `cancelled`.

The command exits 1 when an attempt started early, a run had no or several terminal events,
or a cancelled run started again.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

from benchmarks.common import (
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_CRASHED,
    RUN_SUBMITTED,
    WORKER_STARTED,
    CpuMeter,
    EventWatch,
    Publisher,
    Seen,
    WorkerProcess,
    command_line,
    new_id,
    print_table,
    run_benchmark,
    summarize_ms,
    vhost,
    wait_for_quiet,
    wait_workers_started,
)

RUN_RETRYING = "mq_worker.run.retrying"
TERMINAL = (RUN_COMPLETED, RUN_CRASHED, RUN_CANCELLED)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    seen: dict[str, list[Seen]] = defaultdict(list)
    retrying_seen: asyncio.Queue[Seen] = asyncio.Queue()

    def on_event(event: Seen) -> None:
        seen[event.subject or ""].append(event)
        if event.type == RUN_RETRYING:
            retrying_seen.put_nowait(event)

    with vhost("retries") as host:
        worker = WorkerProcess(host.url, limit=args.limit, name="retries-0")
        types = [WORKER_STARTED, RUN_SUBMITTED, RUN_RETRYING, *TERMINAL]
        async with EventWatch(host.url, types) as watch, Publisher(host.url) as publisher:
            watch.on_event = on_event
            worker.start()
            try:
                await wait_workers_started(watch, [worker.name], [worker])
                meter = CpuMeter([worker])
                meter.start()
                delays: dict[str, float] = {}
                for delay in args.delays:
                    for _ in range(args.runs):
                        run_id = new_id()
                        delays[run_id] = delay
                        await publisher.publish_run(run_id, "false", retries=1,
                                                    retry_delay_seconds=delay)
                cancelled_runs: dict[str, float] = {}
                for _ in range(args.cancels):
                    run_id = new_id()
                    cancelled_runs[run_id] = 0.0
                    await publisher.publish_run(run_id, "false", retries=1,
                                                retry_delay_seconds=30)
                while not all(cancelled_runs.values()):
                    event = await asyncio.wait_for(retrying_seen.get(), 60)
                    if event.subject in cancelled_runs:
                        cancelled_runs[event.subject] = await publisher.cancel(event.subject)
                last_due = time.time() + 32
                while time.time() < last_due + args.grace:
                    worker.check_alive()
                    if all(any(e.type in TERMINAL for e in seen[r]) for r in delays) \
                            and time.time() > last_due:
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)  # late duplicates, if any, would show now
                cpu = meter.stop()
            finally:
                stopped = worker.stop()
    return {"seen": seen, "delays": delays, "cancelled": cancelled_runs, "cpu": cpu,
            "worker_exit": stopped}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    seen: dict[str, list[Seen]] = result["seen"]
    rows, problems = [], []
    for delay in sorted(set(result["delays"].values())):
        late, intervals = [], []
        group = [r for r, d in result["delays"].items() if d == delay]
        for run_id in group:
            events = seen[run_id]
            submitted = [e for e in events if e.type == RUN_SUBMITTED]
            retrying = [e for e in events if e.type == RUN_RETRYING]
            terminal = [e for e in events if e.type in TERMINAL]
            if len(submitted) != 2 or len(retrying) != 1 or len(terminal) != 1:
                problems.append(f"{run_id}: {[e.type for e in events]}")
                continue
            announced = datetime.fromisoformat(retrying[0].data["next_start_time"]).timestamp()
            late.append(submitted[1].produced - announced)
            intervals.append(submitted[1].produced - submitted[0].produced)
        early = sum(1 for x in late if x < 0)
        if early:
            problems.append(f"{early} attempts started early with delay {delay}")
        rows.append({"delay_s": delay, "runs": len(group), "early": early,
                     "lateness_ms": summarize_ms(late),
                     "interval_s_min": round(min(intervals), 3) if intervals else None})
    latencies = []
    for run_id, sent in result["cancelled"].items():
        events = seen[run_id]
        terminal = [e for e in events if e.type in TERMINAL]
        submitted = [e for e in events if e.type == RUN_SUBMITTED]
        if [e.type for e in terminal] != [RUN_CANCELLED] or len(submitted) != 1:
            problems.append(f"cancelled {run_id}: {[e.type for e in events]}")
            continue
        latencies.append(terminal[0].received - sent)
    return {"punctuality": rows, "cancel_latency_ms": summarize_ms(latencies),
            "problems": problems}


def report(summary: dict[str, Any], cpu: dict[str, float]) -> None:
    print_table(
        "next attempt: submitted minus the announced next_start_time (ms)",
        ["delay", "runs", "early", "p50", "p90", "max", "attempt interval min, s"],
        [[f"{r['delay_s']:g} s", r["runs"], r["early"], r["lateness_ms"].get("p50"),
          r["lateness_ms"].get("p90"), r["lateness_ms"].get("max"), r["interval_s_min"]]
         for r in summary["punctuality"]])
    c = summary["cancel_latency_ms"]
    print_table("cancel during the retry wait: cancel published -> cancelled received (ms)",
                ["cancels", "p50", "p90", "max"],
                [[c.get("n"), c.get("p50"), c.get("p90"), c.get("max")]])
    print(f"\nworker CPU: {cpu}")
    for problem in summary["problems"]:
        print("PROBLEM:", problem, file=sys.stderr)


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--delays", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.0, 2.0, 15.0])
    parser.add_argument("--cancels", type=int, default=20)
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--grace", type=float, default=30.0)
    result = run_benchmark("retries", parser.parse_args(), measure_when_quiet,
                           lambda result: report(result, result["cpu"]))
    sys.exit(1 if result["problems"] else 0)


async def measure_when_quiet(args: argparse.Namespace) -> dict[str, Any]:
    quiet = wait_for_quiet(timeout=30)
    result = await measure(args)
    return {"settings": vars(args), "background_load": quiet, "cpu": result["cpu"],
            **summarize(result)}


if __name__ == "__main__":
    main()
