"""Latency: publish -> run started, at paced rates and in bursts, measured from outside.

    .venv/bin/python -m benchmarks.latency [--rates 50,500] [--seconds 10] [--bursts 3x200]
        [--breakdown] [--tree DIR]

One worker process (`python -m mq_worker start --limit 8`). Runs are published with plain
aio-pika; their command is the probe (benchmarks/probe.c), which records its own start. Per run:

* exec: publish -> the run's process started (the probe's clock, first thing in main());
* pending / submitted: publish -> the worker's `pending` / `submitted` event, by the event's
  own time (when the worker produced it: message parsed / process spawned);
* received: publish -> the `submitted` event received by this subscriber.

Publish times are taken just before the publish call; every clock is the same host's.

`--marks` also times the hops inside the worker (benchmarks/worker_marks, a few µs each).
`--breakdown` (as root) also records the broker's traffic on the loopback (benchmarks._wiretap)
and splits each paced run's publish -> received into its steps: the publisher, the broker's
delivery, the worker up to `pending`, the spawn, the worker's outbox, the broker's routing of
the event, the subscriber. `--tree DIR` runs the worker from another checkout (before/after).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._breakdown import STEPS, breakdown, marks_breakdown, points
from benchmarks._paths import BENCH, ROOT
from benchmarks._wiretap import Wiretap, messages
from benchmarks.ceiling import run_ceiling
from benchmarks.common import (
    FAILURES,
    RUN_PENDING,
    RUN_SUBMITTED,
    WORKER_STARTED,
    CpuMeter,
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
    summarize_ms,
    vhost,
    wait_for_quiet,
    wait_workers_started,
    workers,
)

METRICS = ("exec", "pending", "submitted", "received")


class Bench:
    def __init__(self, publisher: Publisher, watch: EventWatch, probe: ProbeLog, command: str,
                 worker: WorkerProcess) -> None:
        self.publisher = publisher
        self.watch = watch
        self.probe = probe
        self.command = command
        self.worker = worker
        # Per paced phase: its run ids and their publish times, for the breakdown.
        self.paced: dict[str, dict[str, float]] = {}

    async def _paced(self, ids: list[str], rate: float) -> dict[str, float]:
        sent: dict[str, float] = {}

        async def one(run_id: str) -> None:
            sent[run_id] = await self.publisher.publish_run(run_id, self.command)

        tasks = []
        start = time.monotonic() + 0.02
        for i, run_id in enumerate(ids):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(run_id)))
        await asyncio.gather(*tasks)
        return sent

    async def _burst(self, ids: list[str]) -> dict[str, float]:
        times = await self.publisher.publish_many(run_body(i, self.command) for i in ids)
        return dict(zip(ids, times, strict=True))

    async def phase(self, label: str, count: int, rate: float | None) -> dict[str, Any]:
        ids = [new_id() for _ in range(count)]
        before = self.watch.counts[RUN_SUBMITTED]
        meter = CpuMeter([self.worker])
        meter.start()
        began = time.monotonic()
        sent = await (self._paced(ids, rate) if rate else self._burst(ids))
        if rate and label != "warm-up":
            self.paced[label] = sent
        published_in = time.monotonic() - began
        await self.watch.wait_count(RUN_SUBMITTED, before + count, timeout=60 + count / 50,
                                    check=self.worker.check_alive)
        elapsed = time.monotonic() - began
        cpu = meter.stop()
        deadline = time.monotonic() + 10
        while any(i not in self.probe.started for i in ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            self.probe.read()
        failures = sum(self.watch.counts[t] for t in FAILURES)
        samples: dict[str, list[float]] = {m: [] for m in METRICS}
        for run_id in ids:
            t0 = sent[run_id]
            submitted = self.watch.events[RUN_SUBMITTED][run_id]
            pending = self.watch.events[RUN_PENDING].get(run_id)
            if run_id in self.probe.started:
                samples["exec"].append(self.probe.started[run_id] - t0)
            if pending is not None:
                samples["pending"].append(pending.produced - t0)
            samples["submitted"].append(submitted.produced - t0)
            samples["received"].append(submitted.received - t0)
        result = {
            "phase": label,
            "runs": count,
            "rate_asked": rate,
            "rate_published": round(count / published_in, 1),
            "seconds": round(elapsed, 3),
            "failures": failures,
            "worker_cpu_ms_per_run": round(cpu["workers_cpu_s"] * 1000 / count, 3),
            "broker_cpu_ms_per_run": round(cpu["broker_cpu_s"] * 1000 / count, 3),
            "others_cores": cpu["others_cores"],
            **{m: summarize_ms(v) for m, v in samples.items()},
        }
        if rate is None:
            result["makespan_ms"] = round(
                (max(self.probe.started.get(i, 0.0) for i in ids) - min(sent.values())) * 1000, 1)
        return result


async def measure_latency(
    rates: list[float], seconds: float, burst_count: int = 0, burst_size: int = 0, *,
    limit: int = 8, loop: str = "auto", env: dict[str, str] | None = None,
    tree: Path = ROOT, tap: bool = False, marks: bool = False,
) -> list[dict[str, Any]]:
    """The phases (paced rates, then bursts) measured on one fresh worker process."""
    command_path = probe_command()
    phases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mqw-latency-") as tmp, vhost("latency") as host:
        log_path = Path(tmp) / "probe.log"
        command = f"{command_path} {log_path}"
        probe = ProbeLog(log_path)
        types = [WORKER_STARTED, RUN_PENDING, RUN_SUBMITTED, *FAILURES]
        capture = Path(tmp) / "wire.pickle"
        marked = Path(tmp) / "marks.json"
        if marks:
            env = {**(env or {}), "PYTHONPATH": str(BENCH / "worker_marks"),
                   "MQ_WORKER_MARKS": str(marked)}
        with contextlib.ExitStack() as stack:
            if tap:
                stack.enter_context(Wiretap(capture))
            bench = await _measure(host.url, types, probe, command, limit, loop, env, tree,
                                   rates, seconds, burst_count, burst_size, phases)
        for phase in phases:
            sent = bench.paced.get(phase["phase"])
            if sent is not None and tap:
                phase["breakdown"] = breakdown(points(messages(capture), sent, sent,
                                                      bench.watch.events))
            if sent is not None and marks and marked.exists():
                phase["marks"] = marks_breakdown(marked, sent)
    return phases


async def _measure(url: str, types: list[str], probe: ProbeLog, command: str, limit: int,
                   loop: str, env: dict[str, str] | None, tree: Path, rates: list[float],
                   seconds: float, burst_count: int, burst_size: int,
                   phases: list[dict[str, Any]]) -> Bench:
    async with EventWatch(url, types) as watch, Publisher(url) as publisher:
        with workers(url, 1, limit=limit, prefix="latency", loop=loop,
                     env=env, tree=tree) as started:
            await wait_workers_started(watch, [w.name for w in started], started)
            bench = Bench(publisher, watch, probe, command, started[0])
            await bench.phase("warm-up", 100, 50.0)
            for rate in rates:
                await asyncio.sleep(1.0)
                phases.append(await bench.phase(f"paced {rate:g}/s", int(rate * seconds),
                                                rate))
            bursts: list[dict[str, Any]] = []
            for _ in range(burst_count):
                await asyncio.sleep(1.0)
                bursts.append(await bench.phase(f"burst of {burst_size}", burst_size, None))
            if bursts:
                phases.append(_merge_bursts(bursts))
    return bench


def floors(rate: float, count: int) -> list[dict[str, Any]]:
    """The broker's and the operating system's parts alone, measured by bare loops."""
    return [
        run_ceiling(["amqp-latency", "--queue-type", "quorum", "--rate", str(rate),
                     "--count", str(count)]),
        run_ceiling(["amqp-latency", "--queue-type", "classic", "--rate", str(rate),
                     "--count", str(count)]),
        run_ceiling(["spawn-latency", "--rate", str(rate), "--count", str(count)]),
    ]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    background = wait_for_quiet(timeout=args.quiet)
    floor = floors(50.0, 500) if args.floors else []
    phases = await measure_latency(args.rates, args.seconds, args.burst_count, args.burst_size,
                                   limit=args.limit, loop=args.loop, env=args.env,
                                   tree=args.tree, tap=args.breakdown, marks=args.marks)
    return {"limit": args.limit, "loop": args.loop, "worker_env": args.env, "floors": floor,
            "tree": str(args.tree),
            "phases": phases, "background_cores_before": background}


def _merge_bursts(bursts: list[dict[str, Any]]) -> dict[str, Any]:
    """The bursts as one phase: latencies per burst summarized by their medians' worst."""
    merged = dict(bursts[-1])
    merged["phase"] = f"{len(bursts)} bursts of {bursts[0]['runs']}"
    merged["bursts"] = bursts
    for metric in METRICS:
        merged[metric] = {k: max(b[metric][k] for b in bursts) for k in bursts[0][metric]}
    merged["makespan_ms"] = max(b["makespan_ms"] for b in bursts)
    merged["rate_published"] = min(b["rate_published"] for b in bursts)
    return merged


FLOOR_LABELS = {
    ("amqp-latency", "quorum"): "bare aio-pika: publish -> consumed, quorum queue",
    ("amqp-latency", "classic"): "bare aio-pika: publish -> consumed, classic queue",
    ("spawn-latency", None): "bare loop: Popen(probe) called -> probe's main()",
}


def report(result: dict[str, Any]) -> None:
    if result.get("floors"):
        print_table("floors at 50/s, ms",
                    ["measure", "n", "p50", "p90", "p99", "max"],
                    [[FLOOR_LABELS[(f["kind"], f.get("queue_type"))], f["latency"]["n"],
                      f["latency"]["p50"], f["latency"]["p90"], f["latency"]["p99"],
                      f["latency"]["max"]] for f in result["floors"]])
    rows = []
    for phase in result["phases"]:
        for metric in METRICS:
            s = phase[metric]
            rows.append([phase["phase"], f"publish -> {metric}", s["n"], s["p50"], s["p90"],
                         s["p99"], s["max"]])
    settings = "".join(f", {k}={v}" for k, v in result.get("worker_env", {}).items())
    print_table(f"publish -> started, one worker (limit {result['limit']}{settings}), ms",
                ["phase", "measure", "runs", "p50", "p90", "p99", "max"], rows)
    print_table("load", ["phase", "published/s", "failures", "worker CPU ms/run",
                         "broker CPU ms/run", "burst makespan ms", "other load (cores)"],
                [[p["phase"], p["rate_published"], p["failures"], p["worker_cpu_ms_per_run"],
                  p["broker_cpu_ms_per_run"], p.get("makespan_ms"), p["others_cores"]]
                 for p in result["phases"]])
    for phase in result["phases"]:
        if "breakdown" in phase:
            steps = phase["breakdown"]["steps"]
            print_table(f"{phase['phase']}: publish -> `submitted` received, step by step, ms",
                        ["step", "n", "p50", "p90", "p99", "max"],
                        [[label, steps[label].get("n"), steps[label].get("p50"),
                          steps[label].get("p90"), steps[label].get("p99"),
                          steps[label].get("max")] for label, _, _ in STEPS])
            print(f"`submitted` in the same socket write as `pending`: "
                  f"{phase['breakdown']['submitted_with_pending']} of "
                  f"{phase['breakdown']['runs_seen_on_wire']} runs")
        if "marks" in phase:
            marks = phase["marks"]
            print_table(f"{phase['phase']}: inside the worker, ms", ["hop", "n", "p50", "p90",
                                                                     "p99", "max"],
                        [[hop, s.get("n"), s.get("p50"), s.get("p90"), s.get("p99"),
                          s.get("max")] for hop, s in marks.items()])


def parse_args() -> argparse.Namespace:
    parser = command_line(__doc__, quiet=60.0, loop=True)
    parser.add_argument("--rates", default="50,100,500",
                        help="paced rates, runs/s (comma-separated)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each paced phase")
    parser.add_argument("--bursts", default="3x200", help="COUNTxSIZE bursts ('0x0': none)")
    parser.add_argument("--limit", type=int, default=8, help="the worker's --limit")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="worker environment, e.g. MQ_WORKER_WINDOW=8 (repeatable)")
    parser.add_argument("--breakdown", action="store_true",
                        help="split each paced run's path into its steps (needs root)")
    parser.add_argument("--marks", action="store_true",
                        help="time each hop inside the worker (benchmarks/worker_marks)")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the checkout whose mq_worker the worker runs")
    parser.add_argument("--no-floors", dest="floors", action="store_false",
                        help="skip the bare AMQP and spawn latency floors")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.env = dict(item.split("=", 1) for item in args.env)
    args.tree = args.tree.resolve()
    count, _, size = args.bursts.partition("x")
    args.burst_count, args.burst_size = int(count), int(size or 0)
    return args


def main() -> None:
    run_benchmark("latency", parse_args(), main_async, report)


if __name__ == "__main__":
    main()
