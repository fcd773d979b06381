"""Cancel latency: cancel published -> SIGTERM delivered to the run's process.

    .venv/bin/python -m benchmarks.cancel [--cancels 100] [--background 4]
    .venv/bin/python -m benchmarks.cancel --replay 100000

With `--replay N`, instead: the cost of a cancel window of N cancels in this process
(no worker process): CPU and wall time of the cancel follower replaying the stream, of
encoding, decoding and restoring a snapshot of it, and the registry's memory (tracemalloc).

One worker process (`python -m mq_worker start --limit 8`). `background` long runs keep the
worker busy; then, one at a time, a run of the probe (benchmarks/probe.c, which records the
moment SIGTERM reaches it) is published; once its process has started, its cancel is
published with plain aio-pika. Per cancel:

* sigterm: cancel published -> SIGTERM received by the run's process (its own clock);
* cancelled: cancel published -> the `cancelled` event received by this subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiormq
import anyio
import psutil

from benchmarks._amqp import (
    FAILURES,
    RUN_CANCELLED,
    RUN_SUBMITTED,
    WORKER_STARTED,
    EventWatch,
    Publisher,
    new_id,
    publish_cancel_window,
    wait_workers_started,
)
from benchmarks._broker import vhost
from benchmarks._machine import CpuMeter, wait_for_quiet
from benchmarks._probe import ProbeLog, probe_command
from benchmarks._report import print_table, summarize_ms
from benchmarks._runner import command_line, run_benchmark
from benchmarks._workers import workers
from mq_worker import cancel_snapshots
from mq_worker.cancellation import DEFAULT_WINDOW_SECONDS, CancelFollower, CancelRegistry


def process_scan_ms(rounds: int = 20) -> dict[str, float]:
    """What listing a process's descendants with psutil costs on this host (the worker's
    `terminate` does it before it sends SIGTERM): psutil reads every process of the host."""
    me = psutil.Process()
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        me.children(recursive=True)
        samples.append(time.perf_counter() - began)
    return {**summarize_ms(samples), "processes_on_host": len(psutil.pids())}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.ceiling import run_ceiling  # needs uvloop (the 'speed' extra)

    background_before = wait_for_quiet(timeout=args.quiet)
    floors = {
        "stream": run_ceiling(["amqp-latency", "--queue-type", "stream", "--rate", "20",
                               "--count", "100"])["latency"],
        "psutil_scan": process_scan_ms(),
    }
    probe = probe_command()
    sigterm: list[float] = []
    cancelled: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mqw-cancel-") as tmp, vhost("cancel") as host:
        log = ProbeLog(Path(tmp) / "probe.log")
        command = f"{probe} {log.path} 120"
        types = [WORKER_STARTED, RUN_SUBMITTED, RUN_CANCELLED, *FAILURES]
        async with EventWatch(host.url, types) as watch, Publisher(host.url) as publisher:
            with workers(host.url, 1, limit=args.limit, prefix="cancel",
                         loop=args.loop) as started:
                await wait_workers_started(watch, [w.name for w in started], started)
                background = [new_id() for _ in range(args.background)]
                for run_id in background:
                    await publisher.publish_run(run_id, command)
                for run_id in background:
                    await log.wait_started(run_id)
                meter = CpuMeter(started)
                meter.start()
                for i in range(args.warmup + args.cancels):
                    run_id = new_id()
                    await publisher.publish_run(run_id, command, grace_seconds=5)
                    await log.wait_started(run_id)
                    await asyncio.sleep(args.pause)
                    sent = await publisher.cancel(run_id)
                    event = await watch.wait_for(RUN_CANCELLED, run_id, timeout=30)
                    deadline = time.monotonic() + 5
                    while run_id not in log.terminated and time.monotonic() < deadline:
                        await asyncio.sleep(0.001)
                        log.read()
                    if i < args.warmup:
                        continue
                    if run_id in log.terminated:
                        sigterm.append(log.terminated[run_id] - sent)
                    cancelled.append(event.received - sent)
                cpu = meter.stop()
                for run_id in background:
                    await publisher.cancel(run_id)
                for run_id in background:
                    await watch.wait_for(RUN_CANCELLED, run_id, timeout=30)
                failures = sum(watch.counts[t] for t in FAILURES)
    return {
        "limit": args.limit,
        "background_runs": args.background,
        "cancels": args.cancels,
        "failures": failures,
        "sigterm": summarize_ms(sigterm),
        "cancelled_event": summarize_ms(cancelled),
        "cpu": cpu,
        "floors": floors,
        "background_cores_before": background_before,
    }


def _restore(bodies: list[bytes]) -> CancelRegistry:
    snapshot = cancel_snapshots.decode(bodies, pool="default",
                                       window_seconds=DEFAULT_WINDOW_SECONDS)
    assert snapshot is not None
    registry = CancelRegistry()
    registry.restore(snapshot.rows())
    return registry


async def replay_async(count: int) -> dict[str, Any]:
    """Replay `count` cancels into a registry, then snapshot and restore them."""
    with vhost("cancel-replay") as host:
        connection = await aiormq.connect(host.url)
        try:
            channel = await connection.channel()
            published_s = await publish_cancel_window(channel, count)
            registry = CancelRegistry()
            follower = CancelFollower(pool="default", registry=registry,
                                      on_cancel=lambda _: None, on_invalid=lambda _e, _l: None,
                                      max_bytes=1 << 20)
            publisher = await connection.channel()
            cpu, wall = time.process_time(), time.monotonic()
            async with anyio.create_task_group() as tg:
                await tg.start(follower.follow, channel, publisher)
                replay_cpu, replay_wall = time.process_time() - cpu, time.monotonic() - wall
                tg.cancel_scope.cancel()
        finally:
            await connection.close()
    cpu = time.process_time()
    bodies = cancel_snapshots.encode(registry, pool="default", next_offset=count,
                                     last_message="")
    encode_cpu = time.process_time() - cpu
    del registry
    gc.collect()
    cpu = time.process_time()
    restored = _restore(bodies)
    restore_cpu = time.process_time() - cpu
    del restored
    gc.collect()
    tracemalloc.start()  # slows allocation down: a second restore, for its memory only
    restored = _restore(bodies)
    gc.collect()
    registry_bytes, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "cancels": count, "held": len(restored), "publish_s": round(published_s, 1),
        "replay_cpu_s": round(replay_cpu, 2), "replay_wall_s": round(replay_wall, 2),
        "replay_cpu_us_per_cancel": round(1e6 * replay_cpu / count, 1),
        "snapshot_bytes": sum(map(len, bodies)), "snapshot_encode_cpu_s": round(encode_cpu, 3),
        "snapshot_restore_cpu_s": round(restore_cpu, 3),
        "registry_mib_per_100k": round(registry_bytes / 2**20 * 100_000 / count, 1),
    }


def report_replay(replay: dict[str, Any]) -> None:
    print_table("cancel window replay, in this process", list(replay), [list(replay.values())])


def report(result: dict[str, Any]) -> None:
    rows = [[f"cancel published -> {label}", s["n"], s["p50"], s["p90"], s["p99"], s["max"]]
            for label, s in (("SIGTERM received by the run", result["sigterm"]),
                             ("cancelled event received", result["cancelled_event"]))]
    floors = result["floors"]
    rows += [
        [f"floor: {label}", s["n"], s["p50"], s["p90"], s["p99"], s["max"]]
        for label, s in (
            ("bare aio-pika publish -> consumed, stream queue", floors["stream"]),
            ("psutil children(recursive=True) with "
             f"{floors['psutil_scan']['processes_on_host']} processes on the host",
             floors["psutil_scan"]),
        )
    ]
    print_table(f"cancel latency, one worker (limit {result['limit']}, "
                f"{result['background_runs']} other runs running), ms",
                ["measure", "cancels", "p50", "p90", "p99", "max"], rows)


def main() -> None:
    parser = command_line(__doc__, quiet=60.0, loop=True)
    parser.add_argument("--replay", type=int, default=0,
                        help="measure the replay of this many cancels instead")
    parser.add_argument("--cancels", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--background", type=int, default=4, help="other runs kept running")
    parser.add_argument("--pause", type=float, default=0.02,
                        help="seconds between a run's start and its cancel")
    parser.add_argument("--limit", type=int, default=8)
    args = parser.parse_args()
    if args.replay:
        run_benchmark("cancel", args, lambda a: replay_async(a.replay), report_replay,
                      results_name="cancel-replay")
    else:
        run_benchmark("cancel", args, main_async, report)


if __name__ == "__main__":
    main()
