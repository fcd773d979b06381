"""Timed delivery: how close to its scheduled start time a run published ahead starts.

    .venv/bin/python -m benchmarks.timed [--delays 1,5,30,120,600] [--runs 20] [--max-delay 30]

One worker process (`python -m mq_worker start --limit 64`, default `--prefetch-seconds` 10).
For each delay, `runs` runs of the probe (benchmarks/probe.c, which reads the clock first thing
in `main()`) are published in one go, each with `scheduled_start_time` = its publish time +
the delay + a random fraction of a second (schedules are not aligned with publish times, and
the fraction decides how early a parked run comes back). They are published with
`mq_worker.Publisher`, not plain aio-pika like the other benchmarks, because what is measured
includes the publisher's own parking. With the default settings a run takes one of three paths:

* held: due within the worker's prefetch window (10 s): the worker takes it and holds it;
* parked by the worker: due 10-60 s ahead: the worker takes it and parks it in the ladder;
* parked by the publisher: due more than 60 s ahead: published straight into the ladder.

Per run:

* lateness: the probe's clock at `main()` minus the scheduled start time (negative = early);
* back before due: the scheduled start time minus the `pending` event's own `time` (when the
  worker took the run: at once when held, when it came out of the ladder when parked);
* ladder transit (runs parked by the publisher): the `pending` event's `time` minus (the time
  `submit` was called + the whole seconds the run was parked for, `mq_worker.delay.park_seconds`
  with the publisher's assumed 2 s window): what publishing, the hops through the ladder's
  queues and the delivery to the worker add to the parked seconds.

Per delay the table gives the count, how many started, how many started early (must be 0),
and min/p50/p90/max lateness. The command exits 1 when a run started early, started twice or
did not start. `--max-delay 30` is the quick run (~1 min); the full run takes ~11 min.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FAILURES,
    RUN_PENDING,
    RUN_SUBMITTED,
    WORKER_STARTED,
    CpuMeter,
    EventWatch,
    ProbeLog,
    Seen,
    WorkerProcess,
    command_line,
    new_id,
    percentile,
    print_table,
    probe_command,
    run_benchmark,
    vhost,
    wait_for_quiet,
    wait_workers_started,
)
from mq_worker.delay import park_seconds
from mq_worker.publisher import DEFAULT_PARK_AFTER_SECONDS, Publisher, new_run

DEFAULT_DELAYS = "1,5,30,120,600"


def path_of(ahead: float, prefetch: float) -> str:
    """Which way a run published `ahead` seconds before its start time goes (see above)."""
    if ahead <= prefetch:
        return "held"
    if ahead <= DEFAULT_PARK_AFTER_SECONDS:
        return "parked by the worker"
    return "parked by the publisher"


def stats_ms(values: list[float]) -> dict[str, Any]:
    """min, p50, p90, max of seconds, in milliseconds."""
    ordered = sorted(v * 1000 for v in values)
    if not ordered:
        return {"n": 0}
    return {"n": len(ordered), "min": round(ordered[0], 3),
            "p50": round(percentile(ordered, 50), 3), "p90": round(percentile(ordered, 90), 3),
            "max": round(ordered[-1], 3)}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    probe = probe_command()
    rng = random.Random(args.seed)
    submitted: dict[str, list[Seen]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="mqw-timed-") as tmp, vhost("timed") as host:
        log = ProbeLog(Path(tmp) / "probe.log")
        command = f"{probe} {log.path}"
        types = [WORKER_STARTED, RUN_PENDING, RUN_SUBMITTED, *FAILURES]
        worker = WorkerProcess(
            host.url, limit=args.limit, name="timed-0", loop=args.loop,
            extra_args=["--prefetch-seconds", str(args.prefetch)],
        )
        async with EventWatch(host.url, types) as watch, Publisher(host.url) as publisher:
            watch.on_event = lambda seen: (
                submitted[seen.subject or ""].append(seen) if seen.type == RUN_SUBMITTED
                else None)
            worker.start()
            try:
                await wait_workers_started(watch, [worker.name], [worker])
                meter = CpuMeter([worker])
                meter.start()
                runs: dict[str, dict[str, Any]] = {}
                # Shortest delays first, so that publishing the others does not eat into them.
                for delay in sorted(args.delays):
                    for _ in range(args.runs):
                        run_id = new_id()
                        sent = time.time()
                        due = sent + delay + rng.random()
                        await publisher.submit(new_run(
                            command, id=run_id, name=f"timed-{delay:g}s",
                            job_variables={"stream_output": False},
                            scheduled_start_time=datetime.fromtimestamp(due, UTC)))
                        runs[run_id] = {"delay": delay, "sent": sent, "due": due,
                                        "path": path_of(due - sent, args.prefetch)}
                last_due = max(r["due"] for r in runs.values())
                print(f"\n{len(runs)} runs published; the last is due in "
                      f"{last_due - time.time():.0f} s", file=sys.stderr)
                deadline = last_due + args.grace
                while time.time() < deadline:
                    worker.check_alive()
                    log.read()
                    if all(r in log.started and r in submitted for r in runs):
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)  # late duplicates, if any, would show now
                log.read()
                cpu = meter.stop()
            finally:
                stopped = worker.stop()
    for run_id, run in runs.items():
        pending = watch.events[RUN_PENDING].get(run_id)
        run["started"] = log.started.get(run_id)
        run["lateness"] = run["started"] - run["due"] if run["started"] is not None else None
        run["submitted_events"] = len(submitted.get(run_id, []))
        run["late_by_seconds"] = (submitted[run_id][0].data.get("late_by_seconds")
                                  if submitted.get(run_id) else None)
        run["back_before_due"] = run["due"] - pending.produced if pending is not None else None
        # As the publisher computes it when it publishes. (The worker parks when it has
        # taken the run and declared the ladder: not known from outside.)
        run["parked_seconds"] = (park_seconds(run["due"] - run["sent"], 2.0)
                                 if run["path"] == "parked by the publisher" else None)
        run["transit"] = (pending.produced - run["sent"] - run["parked_seconds"]
                          if pending is not None and run["parked_seconds"] is not None else None)
    return {"runs": runs, "cpu": cpu, "worker_exit": stopped,
            "failures": {t: watch.counts[t] for t in FAILURES}}


def summarize(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for delay in sorted({r["delay"] for r in runs.values()}):
        group = [r for r in runs.values() if r["delay"] == delay]
        started = [r for r in group if r["lateness"] is not None]
        back = sorted(r["back_before_due"] for r in group if r["back_before_due"] is not None)
        rows.append({
            "delay_s": delay,
            "paths": sorted({r["path"] for r in group}),
            "runs": len(group),
            "started": len(started),
            "early": sum(1 for r in started if r["lateness"] < 0),
            "duplicates": sum(1 for r in group if r["submitted_events"] > 1),
            "late_over_1s": sum(1 for r in started if r["lateness"] > 1.0),
            "lateness_ms": stats_ms([r["lateness"] for r in started]),
            "transit_ms": stats_ms([r["transit"] for r in group if r["transit"] is not None]),
            "ladder_queues": sorted({bin(r["parked_seconds"]).count("1") for r in group
                                     if r["parked_seconds"] is not None}),
            "worker_late_by_max_ms": round(1000 * max(
                (r["late_by_seconds"] or 0.0 for r in group), default=0.0), 3),
            "back_before_due_s": {
                "min": round(back[0], 3) if back else None,
                "p50": round(percentile(back, 50), 3) if back else None,
                "max": round(back[-1], 3) if back else None,
            },
        })
    return rows


def report(result: dict[str, Any]) -> None:
    rows = []
    for row in result["delays"]:
        lateness = row["lateness_ms"]
        back = row["back_before_due_s"]
        transit = row["transit_ms"]
        queues = row["ladder_queues"]
        rows.append([f"{row['delay_s']:g} s", ", ".join(row["paths"]), row["runs"],
                     row["started"], row["early"], lateness.get("min"), lateness.get("p50"),
                     lateness.get("p90"), lateness.get("max"), back["min"], back["max"],
                     f"{queues[0]}-{queues[-1]}" if queues else None,
                     transit.get("p50"), transit.get("max")])
    print_table(
        f"scheduled start -> process started (probe's main()), one worker (limit "
        f"{result['limit']}, prefetch {result['prefetch_seconds']:g} s); lateness in ms; "
        f"'back' = seconds between the worker taking the run and its start time; "
        f"ladder queues waited in, and ladder transit in ms",
        ["delay", "path", "runs", "started", "early", "min", "p50", "p90", "max",
         "back min s", "back max s", "queues", "transit p50", "transit max"], rows)
    all_started = [r for r in result["runs"].values() if r["lateness"] is not None]
    early = sum(1 for r in all_started if r["lateness"] < 0)
    print(f"\nearly starts: {early}")
    print(f"not started: {len(result['runs']) - len(all_started)}")
    print(f"started twice: {sum(r['duplicates'] for r in result['delays'])}")
    print(f"late by more than 1 s: {sum(r['late_over_1s'] for r in result['delays'])}")
    print(f"other load (cores): {result['cpu']['others_cores']}")


def parse_args() -> argparse.Namespace:
    parser = command_line(__doc__, quiet=60.0, loop=True)
    parser.add_argument("--delays", default=DEFAULT_DELAYS,
                        help="seconds ahead of publishing (comma-separated)")
    parser.add_argument("--max-delay", type=float, default=None,
                        help="leave out longer delays (e.g. 30 for a quick run)")
    parser.add_argument("--runs", type=int, default=20, help="runs per delay")
    parser.add_argument("--limit", type=int, default=64, help="the worker's --limit")
    parser.add_argument("--prefetch", type=float, default=10.0,
                        help="the worker's --prefetch-seconds")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds to wait for runs after the last one is due")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random fractions")
    args = parser.parse_args()
    args.delays = [float(d) for d in args.delays.split(",") if d]
    if args.max_delay is not None:
        args.delays = [d for d in args.delays if d <= args.max_delay]
    if not args.delays:
        parser.error("no delay left")
    return args


async def measure_when_quiet(args: argparse.Namespace) -> dict[str, Any]:
    background = wait_for_quiet(timeout=args.quiet)
    measured = await measure(args)
    return {
        "limit": args.limit, "prefetch_seconds": args.prefetch, "runs_per_delay": args.runs,
        "background_cores_before": background, **measured,
        "delays": summarize(measured["runs"]),
    }


def main() -> None:
    result = run_benchmark("timed", parse_args(), measure_when_quiet, report)
    bad = [r for r in result["delays"]
           if r["early"] or r["duplicates"] or r["started"] < r["runs"]]
    if bad:
        print("FAILED: runs started early, twice or not at all", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
