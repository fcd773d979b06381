"""Throughput: runs/s end to end for /bin/true, against the machine's ceilings measured in the
same run.

    .venv/bin/python -m benchmarks.throughput [--limits 1,8,32] [--workers 1,2] [--runs 4000]

For each (limit, workers): fresh worker processes (`python -m mq_worker start`) on one queue
of a vhost of their own. After a warm-up, `runs` runs of /bin/true (stream_output false) are
published as fast as publisher confirms allow (plain aio-pika, 256 unconfirmed at most), and
the clock stops when this subscriber has received the last `completed` event. Reported:
runs/s over the whole batch (first publish -> last completed) and in steady state (between
the 10th and the 90th percentile of completions), and CPU per run of the workers (runs
included), the broker and this process.

Other processes' load spoils such figures on a small machine: each measurement waits for a
quiet machine and is repeated (up to 3 times) when other processes used more than 0.3 cores
while it ran; the least disturbed attempt is kept and its "other load" reported.

The ceilings (benchmarks/ceiling.py, each in a process of its own): a bare asyncio loop that
spawns /bin/true with the same concurrency, with the default child watcher and with pidfds
(measured again right before each worker measurement; the ratios use those), and a bare
aio-pika consume+ack loop on a quorum queue.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

from benchmarks.ceiling import run_ceiling
from benchmarks.common import (
    FAILURES,
    RUN_COMPLETED,
    WORKER_STARTED,
    CpuMeter,
    EventWatch,
    Publisher,
    command_line,
    least_disturbed,
    new_id,
    percentile,
    print_table,
    run_benchmark,
    run_body,
    vhost,
    wait_for_quiet,
    wait_workers_started,
    workers,
)

TRUE = "/bin/true"
SPAWN_METHODS = ("default", "pidfd", "popen-pidfd", "uvloop")


async def measure_workers(
    limit: int, count: int, runs: int, *, loop: str = "auto", warmup: int = 300,
    env: dict[str, str] | None = None, label: str = "",
) -> dict[str, Any]:
    """Runs/s of `count` worker processes at `limit` for `runs` runs of /bin/true."""
    with vhost(f"tp-{limit}x{count}") as host:
        types = [WORKER_STARTED, RUN_COMPLETED, *FAILURES]
        async with EventWatch(host.url, types) as watch, Publisher(host.url) as publisher:
            with workers(host.url, count, limit=limit, prefix=f"tp-{limit}x{count}",
                         loop=loop, env=env) as started:
                await wait_workers_started(watch, [w.name for w in started], started)

                def alive() -> None:
                    for worker in started:
                        worker.check_alive()

                await publisher.publish_many(run_body(new_id(), TRUE) for _ in range(warmup))
                await watch.wait_count(RUN_COMPLETED, warmup, 120, alive)
                completions: list[float] = []
                watch.on_event = lambda seen: (
                    completions.append(seen.received) if seen.type == RUN_COMPLETED else None
                )
                meter = CpuMeter(started)
                meter.start()
                first = time.time()
                await publisher.publish_many(run_body(new_id(), TRUE) for _ in range(runs))
                published = time.time()
                await watch.wait_count(RUN_COMPLETED, warmup + runs, 120 + runs / 20, alive)
                cpu = meter.stop()
                watch.on_event = None
    completions.sort()
    last = completions[-1]
    low, high = percentile(completions, 10), percentile(completions, 90)
    in_window = sum(1 for c in completions if low < c <= high)
    return {
        "label": label or f"mq_worker, {count} worker{'s' if count > 1 else ''}",
        "limit": limit,
        "workers": count,
        "loop": loop,
        "env": env or {},
        "runs": runs,
        "failures": sum(watch.counts[t] for t in FAILURES),
        "rate": round(runs / (last - first), 1),
        "steady_rate": round(in_window / (high - low), 1) if high > low else None,
        "publish_rate": round(runs / (published - first), 1),
        "worker_cpu_ms_per_run": round(cpu["workers_cpu_s"] * 1000 / runs, 3),
        "run_process_cpu_ms_per_run": round(cpu["runs_cpu_s"] * 1000 / runs, 3),
        "broker_cpu_ms_per_run": round(cpu["broker_cpu_s"] * 1000 / runs, 3),
        "measurer_cpu_ms_per_run": round(cpu["measurer_cpu_s"] * 1000 / runs, 3),
        "others_cores": cpu["others_cores"],
    }


def spawn_ceilings(concurrency: int, spawns: int, methods: tuple[str, ...]
                   ) -> list[dict[str, Any]]:
    return [
        run_ceiling(["spawn", "--method", method, "--concurrency", str(concurrency),
                     "--count", str(spawns if method != "uvloop" else max(200, spawns // 6))])
        for method in methods
    ]


def amqp_ceilings(messages: int) -> list[dict[str, Any]]:
    return [
        run_ceiling(["amqp", "--prefetch", str(prefetch), "--count", str(messages),
                     "--events", str(events)])
        for prefetch in (2, 8) for events in (0, 3)
    ]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"background_cores_before": wait_for_quiet(timeout=args.quiet)}
    spawn: list[dict[str, Any]] = []
    for limit in args.limits:
        wait_for_quiet(timeout=args.quiet)
        spawn += spawn_ceilings(limit, args.spawns, SPAWN_METHODS)
    result["ceilings"] = {"spawn": spawn, "amqp": amqp_ceilings(args.messages)}
    rows = []

    async def adjacent(limit: int, count: int, runs: int, **options: Any) -> dict[str, Any]:
        # The same ceilings again right before each measurement, so that a ratio never
        # compares moments of different background load.
        ceilings = spawn_ceilings(limit, args.spawns, ("default", "pidfd"))
        row = await measure_workers(limit, count, runs, **options)
        row["adjacent_ceilings"] = {c["method"]: c["rate"] for c in ceilings}
        return row

    for count in args.workers:
        for limit in args.limits:
            runs = args.runs if limit > 1 else max(200, args.runs // 4)
            rows.append(await least_disturbed(
                functools.partial(adjacent, limit, count, runs, loop=args.loop),
                quiet=args.quiet))
    if args.window_variant:
        # The consumer's prefetch window is limit // 4 by default; this row shows what a
        # window as large as the limit gives (MQ_WORKER_WINDOW is a worker setting).
        rows.append(await least_disturbed(functools.partial(
            adjacent, 8, 1, args.runs, loop=args.loop, env={"MQ_WORKER_WINDOW": "8"},
            label="mq_worker, 1 worker, window 8"), quiet=args.quiet))
    if args.asyncio_variant:
        rows.append(await least_disturbed(functools.partial(
            adjacent, 8, 1, args.runs, loop="asyncio",
            label="mq_worker, 1 worker, --loop asyncio"), quiet=args.quiet))
    result["workers"] = rows
    result["background_cores_after"] = wait_for_quiet(timeout=0)
    return result


def spawn_ceiling(result: dict[str, Any], method: str, concurrency: int) -> float | None:
    for row in result["ceilings"]["spawn"]:
        if row["method"] == method and row["concurrency"] == concurrency:
            return float(row["rate"])
    return None


def report(result: dict[str, Any]) -> None:
    spawn = result["ceilings"]["spawn"]
    print_table("ceiling: a bare loop spawning /bin/true (runs/s)",
                ["method", "concurrency", "spawns/s"],
                [[r["method"], r["concurrency"], round(r["rate"], 1)] for r in spawn])
    print_table("ceiling: bare aio-pika consume+ack on a quorum queue (messages/s)",
                ["prefetch", "events published per message", "messages/s"],
                [[r["prefetch"], r["events"], round(r["rate_with_events_confirmed"], 1)]
                 for r in result["ceilings"]["amqp"]])
    rows = []
    for row in result["workers"]:
        concurrency = row["limit"]
        adjacent = row.get("adjacent_ceilings", {})
        default = adjacent.get("default") or spawn_ceiling(result, "default", concurrency)
        pidfd = adjacent.get("pidfd") or spawn_ceiling(result, "pidfd", concurrency)
        rows.append([
            row["label"], row["limit"], row["rate"], row["steady_rate"],
            f"{default:.0f} / {pidfd:.0f}" if default and pidfd else "-",
            f"{row['rate'] / default:.0%}" if default else "-",
            f"{row['rate'] / pidfd:.0%}" if pidfd else "-",
            row["worker_cpu_ms_per_run"], row["run_process_cpu_ms_per_run"],
            row["broker_cpu_ms_per_run"], row["failures"], row["others_cores"],
        ])
    print_table(
        "throughput, /bin/true end to end: publish -> spawn -> exit -> completed received",
        ["workers", "limit", "runs/s", "steady runs/s", "spawn ceiling default / pidfd",
         "of default", "of pidfd", "worker CPU ms/run", "/bin/true CPU ms/run",
         "broker CPU ms/run", "failures", "other load (cores)"],
        rows,
    )


def parse_args() -> argparse.Namespace:
    parser = command_line(__doc__, quiet=60.0, loop=True)
    parser.add_argument("--limits", default="1,8,32")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure")
    parser.add_argument("--runs", type=int, default=4000, help="runs per measurement")
    parser.add_argument("--spawns", type=int, default=3000, help="spawns per ceiling")
    parser.add_argument("--messages", type=int, default=4000, help="messages per AMQP ceiling")
    parser.add_argument("--no-variants", dest="variants", action="store_false",
                        help="skip the window-8 and --loop asyncio rows")
    args = parser.parse_args()
    args.limits = [int(x) for x in args.limits.split(",")]
    args.workers = [int(x) for x in args.workers.split(",")]
    args.window_variant = args.asyncio_variant = args.variants
    return args


def main() -> None:
    run_benchmark("throughput", parse_args(), main_async, report)


if __name__ == "__main__":
    main()
