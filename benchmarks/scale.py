"""Scale: what a pool of N workers costs when idle, and how fast lost workers and cancels travel.

    .venv/bin/python -m benchmarks.scale [--sizes 10,100,1000,10000] [--interval 30]

Two real workers (`python -m mq_worker start`, the first one started is the elected
reporter) and N - 2 simulated ones: one asyncio task in this process that publishes
their heartbeats as the wire contract says (CloudEvent on `mq_worker.events`, routing
key `mq_worker.worker.heartbeat`, `BCC: workers.<pool>`), spread over the interval, on
a connection of its own, without waiting for confirms. For each N, in a vhost of its own:

* heartbeats/s really sent (the simulator's count plus the 2 real workers', against the
  target N / interval) and as the broker's samples of the pool's heartbeat stream saw
  them, broker deliveries/s (management API samples) and broker CPU over a window;
* CPU and RSS of the reporter and of the other real worker;
* lost-worker detection: a simulated worker announcing 1 s heartbeats and holding a
  run stops; delay from its last heartbeat to `worker.lost`;
* reporter failover: the reporter is killed (SIGKILL); delay until the other real
  worker has replayed the pool's heartbeat stream and reports again;
* the cancel window (`--cancels`, first; `--only-cancels` for it alone): the pool's
  first worker starting behind 100,000 cancels (it replays them all; elected reporter,
  it then publishes a snapshot) and a worker joining it (it starts from the snapshot):
  time from process start to `worker.started` against an empty window, RSS (MiB per
  100k cancels); then run start latency (`run.submitted`, median and p99), quiet,
  while another process publishes a burst of 10,000 cancels, and while it publishes
  them to another vhost (what the burst costs the machine and the broker without the
  worker reading it);
* cancel fan-out: one cancel, read by min(N, --max-readers: 100) stream readers
  (simulated workers: `x-stream-offset: next`, 100 per channel) and by the real
  worker, which stops its run: delay until the last reader has it, and until the
  real worker's `run.cancelled`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import signal
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import aiormq
import aiormq.abc
import orjson
import psutil
from pamqp import commands as spec

from benchmarks._amqp import EVENTS_EXCHANGE, RUNS_EXCHANGE, new_id
from benchmarks._broker import VHost, management, vhost
from benchmarks._machine import CpuMeter, wait_for_quiet
from benchmarks._report import percentile, print_table
from benchmarks._runner import command_line, run_benchmark
from benchmarks._workers import WorkerProcess
from mq_worker.cancel_snapshots import SNAPSHOT_EVERY
from mq_worker.events import build_event
from mq_worker.topology import (
    STREAM_OFFSET,
    QueueOptions,
    cancel_snapshot_stream_name,
    declare_cancel_stream,
    declare_exchanges,
)

POOL = "default"
HEARTBEAT = "mq_worker.worker.heartbeat"
LOST = "mq_worker.worker.lost"
CANCELLED = "mq_worker.run.cancelled"


def heartbeat_body(name: str, interval: float, runs: list[dict[str, Any]] | None = None
                   ) -> bytes:
    runs = runs or []
    return build_event(HEARTBEAT, source=f"/mq_worker/workers/{name}", subject=name, data={
        "worker": name, "pool": POOL, "queues": ["default"], "type": "process", "limit": 4,
        "hostname": "simulated", "pid": 1, "version": "0.1.0", "heartbeat_seconds": interval,
        "follows": None, "free_slots": 4 - len(runs), "in_flight": [r["id"] for r in runs],
        "runs": runs, "outbox_depth": 0,
    }).body


async def publish_heartbeat(channel: aiormq.abc.AbstractChannel, body: bytes) -> None:
    await channel.basic_publish(
        body, exchange=EVENTS_EXCHANGE, routing_key=HEARTBEAT,
        properties=spec.Basic.Properties(
            content_type="application/cloudevents+json", delivery_mode=2,
            headers={"BCC": [f"workers.{POOL}"]}),
        wait=False)


_SENT_AT = b"@sent-at@"


async def simulate(channel: aiormq.abc.AbstractChannel, count: int, interval: float,
                   published: list[int] | None = None) -> None:
    """`count` workers heartbeating every `interval` s, spread evenly, until cancelled;
    `published[0]` counts the heartbeats sent."""
    published = published if published is not None else [0]
    names = [f"sim-{i}" for i in range(count)]
    bodies = [heartbeat_body(n, interval) for n in names]
    ticks = max(1, int(interval / 0.05))
    per_tick = -(-count // ticks)
    # Each round's heartbeats carry the time they are sent at: reporters refuse old ones.
    templates = [b.replace(orjson.loads(b)["time"].encode(), _SENT_AT) for b in bodies]
    while True:
        began = time.monotonic()
        now = orjson.dumps(datetime.now(UTC))[1:-1]
        bodies = [t.replace(_SENT_AT, now) for t in templates]
        for start in range(0, count, per_tick):
            for body in bodies[start:start + per_tick]:
                await publish_heartbeat(channel, body)
                published[0] += 1
            await asyncio.sleep(max(0.0, began + (start // per_tick + 1) * interval / ticks
                                    - time.monotonic()))
        await asyncio.sleep(max(0.0, began + interval - time.monotonic()))


def delivery_rate(host: VHost, window: int) -> float:
    stats = management("GET", f"/vhosts/{host.name}?msg_rates_age={window}&msg_rates_incr=5")
    samples = stats.get("message_stats", {}).get("deliver_get_details", {}).get("samples", [])
    if len(samples) < 2:
        return float("nan")
    seconds = (samples[0]["timestamp"] - samples[-1]["timestamp"]) / 1000
    return (samples[0]["sample"] - samples[-1]["sample"]) / seconds


def heartbeat_rate(host: VHost, window: int) -> float:
    """Heartbeats (and other worker events) per second the broker took into the pool's
    heartbeat stream: what the simulated and real workers really published."""
    quoted = urllib.parse.quote(host.name, safe="")
    stats = management("GET", f"/queues/{quoted}/mq_worker.heartbeats-{POOL}"
                              f"?msg_rates_age={window}&msg_rates_incr=5")
    samples = stats.get("message_stats", {}).get("publish_details", {}).get("samples", [])
    if len(samples) < 2:
        return float("nan")
    seconds = (samples[0]["timestamp"] - samples[-1]["timestamp"]) / 1000
    return (samples[0]["sample"] - samples[-1]["sample"]) / seconds


def log_time(worker: WorkerProcess, event: str) -> float | None:
    for line in worker.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == event:
                return datetime.fromisoformat(record["timestamp"]).timestamp()
    return None


async def wait_until(condition: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.05)
    return None


async def measure(size: int, interval: float, window: int, max_readers: int) -> dict[str, Any]:
    with vhost(f"scale{size}") as host:
        real = [WorkerProcess(host.url, limit=1, name=f"scale-{size}-{i}", extra_args=[
            "--heartbeat-seconds", str(interval), "--log-level", "INFO"]) for i in range(2)]
        connection = await aiormq.connect(host.url)
        try:
            real[0].start()
            channel = await connection.channel()
            seen: dict[str, float] = {}

            async def on_event(message: aiormq.abc.DeliveredMessage) -> None:
                event = json.loads(message.body)
                seen.setdefault(f"{event['type']}:{event.get('subject')}", time.time())

            events = await channel.queue_declare("", exclusive=True)
            assert events.queue
            await channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True)
            for key in (LOST, CANCELLED, "mq_worker.worker.started", "mq_worker.run.submitted"):
                await channel.queue_bind(events.queue, EVENTS_EXCHANGE, routing_key=key)
            await channel.basic_consume(events.queue, on_event, no_ack=True)
            await wait_until(lambda: f"mq_worker.worker.started:{real[0].name}" in seen, 120)
            real[1].start()
            await wait_until(lambda: f"mq_worker.worker.started:{real[1].name}" in seen, 120)
            # A connection of its own: event handling here must not hold heartbeats back.
            simulator_connection = await aiormq.connect(host.url)
            published = [0]
            simulator = asyncio.ensure_future(
                simulate(await simulator_connection.channel(), size - 2, interval, published))
            await asyncio.sleep(2 * interval + 5)  # settle: every simulated worker has beaten

            meter = CpuMeter(real)
            processes = [w.process for w in real]
            before = [p.cpu_times() for p in processes]
            meter.start()
            sent_before = published[0]
            await asyncio.sleep(window + 5)
            cpu = meter.stop()
            simulated_rate = (published[0] - sent_before) / cpu["wall_s"]
            after = [p.cpu_times() for p in processes]
            wall = cpu["wall_s"]
            worker_cpu = [round(100 * (a.user + a.system - b.user - b.system) / wall, 2)
                          for a, b in zip(after, before, strict=True)]
            deliveries = delivery_rate(host, window)
            heartbeats = heartbeat_rate(host, window)
            rss = [round(w.rss_bytes() / 2**20, 1) for w in real]

            # Lost-worker detection: a simulated worker with a run stops beating.
            victim = f"victim-{size}"
            run = {"id": new_id(), "name": "r", "queue": "default", "state": "running",
                   "infrastructure_pid": "simulated:1"}
            for _ in range(3):
                await publish_heartbeat(channel, heartbeat_body(victim, 1.0, [run]))
                last_beat = time.time()
                await asyncio.sleep(1.0)
            lost = await wait_until(lambda: seen.get(f"{LOST}:{victim}"), 60)
            detection = lost - last_beat if lost else float("nan")

            # Cancel fan-out: the real survivor runs a run; simulated readers follow cancels.
            readers = min(size, max_readers)
            got: list[float] = []
            reader_channels = []
            for start in range(0, readers, 100):
                reader = await connection.channel()
                await reader.basic_qos(prefetch_count=10)
                for _ in range(min(100, readers - start)):
                    async def on_cancel(message: aiormq.abc.DeliveredMessage,
                                        ch: aiormq.abc.AbstractChannel = reader) -> None:
                        got.append(time.time())
                        await ch.basic_ack(message.delivery.delivery_tag)
                    await reader.basic_consume("mq_worker.cancels", on_cancel,
                                               arguments={"x-stream-offset": "next"})
                reader_channels.append(reader)

            # Reporter failover: kill the reporter; the survivor replays and takes over.
            killed_at = time.time()
            real[0].popen.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            caught_up = await wait_until(
                lambda: log_time(real[1], "reporter has caught up with its pool's heartbeats"),
                120)
            failover = caught_up - killed_at if caught_up else float("nan")

            run_id = new_id()
            body = json.dumps({"id": run_id, "job_variables": {"command": "sleep 300"}})
            await channel.basic_publish(body.encode(), exchange=RUNS_EXCHANGE,
                                        routing_key="run.scheduled.default.default")
            await wait_until(lambda: f"mq_worker.run.submitted:{run_id}" in seen, 60)
            got.clear()
            cancel_at = time.time()
            await channel.basic_publish(json.dumps({"id": run_id}).encode(),
                                        exchange=RUNS_EXCHANGE, routing_key="run.cancel.default")
            await wait_until(lambda: len(got) >= readers, 60)
            fan_out = (max(got) - cancel_at) if len(got) >= readers else float("nan")
            cancelled = await wait_until(lambda: seen.get(f"{CANCELLED}:{run_id}"), 60)
            real_cancel = cancelled - cancel_at if cancelled else float("nan")
            simulator.cancel()
            await simulator_connection.close()
        finally:
            for worker in real:
                worker.stop()
            await connection.close()
    return {
        "workers": size, "interval_s": interval,
        "heartbeats_target_per_s": round(size / interval, 1),
        "simulated_heartbeats_per_s": round(simulated_rate + 2 / interval, 1),
        "stream_heartbeats_per_s": round(heartbeats, 1),
        "deliveries_per_s": round(deliveries, 1),
        "broker_cpu_pct": round(100 * cpu["broker_cpu_s"] / wall, 1),
        "reporter_cpu_pct": worker_cpu[0], "worker_cpu_pct": worker_cpu[1],
        "reporter_rss_mib": rss[0], "worker_rss_mib": rss[1],
        "detection_s": round(detection, 2), "failover_s": round(failover, 2),
        "cancel_readers": readers, "cancel_fan_out_ms": round(1000 * fan_out, 1),
        "cancel_to_cancelled_ms": round(1000 * real_cancel, 1),
        "others_cores": cpu["others_cores"],
    }


async def publish_cancels(channel: aiormq.abc.AbstractChannel, count: int) -> float:
    """Publish `count` cancels of unknown runs, confirmed; return the seconds it took."""
    began = time.monotonic()
    for index in range(count):
        await channel.basic_publish(json.dumps({"id": new_id()}).encode(),
                                    exchange=RUNS_EXCHANGE, routing_key="run.cancel.default",
                                    wait=index == count - 1)
    return time.monotonic() - began


def _publish_cancels_in_process(url: str, count: int) -> None:
    async def publish() -> None:
        connection = await aiormq.connect(url)
        try:
            channel = await connection.channel()
            await publish_cancels(channel, count)
        finally:
            await connection.close()

    asyncio.run(publish())


async def start_time(host: VHost, name: str) -> tuple[float, float, WorkerProcess]:
    """(seconds from process start to `worker.started`, RSS MiB then, the worker)."""
    connection = await aiormq.connect(host.url)
    try:
        channel = await connection.channel()
        await channel.exchange_declare(EVENTS_EXCHANGE, exchange_type="topic", durable=True)
        queue = await channel.queue_declare("", exclusive=True)
        assert queue.queue
        await channel.queue_bind(queue.queue, EVENTS_EXCHANGE,
                                 routing_key="mq_worker.worker.started")
        started = asyncio.Event()
        await channel.basic_consume(queue.queue, lambda _: started.set(), no_ack=True)
        worker = WorkerProcess(host.url, limit=4, name=name)
        began = time.monotonic()
        worker.start()
        await asyncio.wait_for(started.wait(), 600)
        return time.monotonic() - began, worker.rss_bytes() / 2**20, worker
    finally:
        await connection.close()


async def run_latency(channel: aiormq.abc.AbstractChannel, host: VHost, runs: int,
                      burst: int, burst_host: VHost | None = None) -> dict[str, float]:
    """ms from publishing a run of /bin/true to its `run.submitted` (median, p99), while
    another process publishes `burst` cancels: this process only publishes runs and
    watches events, so its own loop does not delay what it measures. With `burst_host`,
    the cancels go to another vhost: what the burst costs the machine and the broker,
    without the worker reading them."""
    submitted: dict[str, float] = {}
    queue = await channel.queue_declare("", exclusive=True)
    assert queue.queue
    await channel.queue_bind(queue.queue, EVENTS_EXCHANGE, routing_key="mq_worker.run.submitted")

    async def on_event(message: aiormq.abc.DeliveredMessage) -> None:
        submitted[json.loads(message.body)["subject"]] = time.monotonic()

    consumer = await channel.basic_consume(queue.queue, on_event, no_ack=True)
    sent: dict[str, float] = {}
    burster = multiprocessing.get_context("spawn").Process(
        target=_publish_cancels_in_process, args=((burst_host or host).url, burst)
    ) if burst else None
    if burster is not None:
        burster.start()
        await asyncio.sleep(0.5)  # the burst is under way before the first run
    for _ in range(runs):
        run_id = new_id()
        sent[run_id] = time.monotonic()
        await channel.basic_publish(
            json.dumps({"id": run_id, "job_variables": {"command": "/bin/true"}}).encode(),
            exchange=RUNS_EXCHANGE, routing_key="run.scheduled.default.default")
        await asyncio.sleep(0.05)
    await wait_until(lambda: len(submitted) >= runs, 120)
    if burster is not None:
        await asyncio.get_running_loop().run_in_executor(None, burster.join)
    assert consumer.consumer_tag
    await channel.basic_cancel(consumer.consumer_tag)
    latencies = sorted(1000 * (submitted[r] - sent[r]) for r in sent if r in submitted)
    if not latencies:
        return {"p50": float("nan"), "p99": float("nan")}
    return {"p50": round(percentile(latencies, 50), 1), "p99": round(percentile(latencies, 99), 1)}


async def wait_for_snapshot(host: VHost, timeout: float = 120) -> bool:
    """Wait until the pool's cancel snapshot stream holds a snapshot."""
    deadline = time.monotonic() + timeout
    # The reporter declares the stream when it publishes its first snapshot.
    while cancel_snapshot_stream_name(POOL) not in await asyncio.to_thread(host.queue_counts):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    connection = await aiormq.connect(host.url)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=1)
        arrived = asyncio.Event()
        await channel.basic_consume(cancel_snapshot_stream_name(POOL),
                                    lambda _: arrived.set(), no_ack=False,
                                    arguments={STREAM_OFFSET: "last"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), timeout)
        return arrived.is_set()
    finally:
        await connection.close()


async def cancel_window(count: int, burst: int, runs: int) -> dict[str, Any]:
    """Workers starting behind `count` cancels (the pool's first, which replays them all,
    and one joining it, which starts from the snapshot the first takes), and runs during a
    burst of `burst` cancels."""
    result: dict[str, Any] = {"cancels": count}
    with vhost("scale-cancels") as host:
        empty, empty_rss, worker = await start_time(host, "cancels-empty")
        worker.stop()
        connection = await aiormq.connect(host.url)
        try:
            channel = await connection.channel()
            await channel.confirm_delivery()
            result["publish_s"] = round(await publish_cancels(channel, count), 1)
            cold, cold_rss, first = await start_time(host, "cancels-first")
            # The first worker writes a snapshot only once the window holds SNAPSHOT_EVERY
            # cancels; below that a joining worker replays them all, as the first did.
            snapshot = count >= SNAPSHOT_EVERY and await wait_for_snapshot(host)
            joining, joining_rss, worker = await start_time(host, "cancels-joining")
            first.stop()
            result.update({
                "start_s_empty": round(empty, 2),
                "start_s_first": round(cold, 2), "start_s_joining": round(joining, 2),
                "snapshot": snapshot,
                "rss_mib_empty": round(empty_rss, 1), "rss_mib_first": round(cold_rss, 1),
                "rss_mib_joining": round(joining_rss, 1),
                "mib_per_100k_first": round((cold_rss - empty_rss) * 100_000 / count, 1),
                "mib_per_100k_joining": round((joining_rss - empty_rss) * 100_000 / count, 1),
            })
            quiet = await run_latency(channel, host, runs, 0)
            during = await run_latency(channel, host, runs, burst)
            with vhost("scale-cancels-elsewhere") as elsewhere:
                other = await aiormq.connect(elsewhere.url)
                try:
                    other_channel = await other.channel()
                    await declare_exchanges(other_channel)
                    await declare_cancel_stream(other_channel, QueueOptions())
                finally:
                    await other.close()
                control = await run_latency(channel, host, runs, burst, burst_host=elsewhere)
            result.update({"burst": burst, "runs": runs,
                           "run_ms_quiet_p50": quiet["p50"], "run_ms_quiet_p99": quiet["p99"],
                           "run_ms_burst_p50": during["p50"],
                           "run_ms_burst_p99": during["p99"],
                           "run_ms_burst_elsewhere_p50": control["p50"],
                           "run_ms_burst_elsewhere_p99": control["p99"]})
            worker.stop()
        finally:
            await connection.close()
    return result


async def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    load = wait_for_quiet(timeout=args.quiet)
    window = None
    if args.cancels:
        window = await cancel_window(args.cancels, args.burst, args.runs)
        print(json.dumps(window), flush=True)
    if args.only_cancels:
        return {"cancel_window": window}
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        result = await measure(size, args.interval, args.window, args.max_readers)
        rows.append(result)
        print(json.dumps(result), flush=True)
    return {"rows": rows, "cancel_window": window, "cpu_count": psutil.cpu_count(),
            "background_cores_before": load}


def report(result: dict[str, Any]) -> None:
    window = result["cancel_window"]
    if window:
        print_table("cancel window", list(window), [list(window.values())])
    rows = result.get("rows")
    if rows:
        columns = list(rows[0])
        print_table(f"idle pool, heartbeats every {rows[0]['interval_s']:g} s (other load "
                    f"before: {result['background_cores_before']:.2f} cores)",
                    columns, [[r[c] for c in columns] for r in rows])


def main() -> None:
    parser = command_line(__doc__, quiet=60.0)
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--interval", type=float, default=30.0,
                        help="heartbeat interval of every worker, seconds (default 30, the "
                        "workers' default)")
    parser.add_argument("--window", type=int, default=20, help="measuring window, seconds")
    parser.add_argument("--max-readers", type=int, default=100,
                        help="simulated cancel-stream readers at most (default 100; 1000 stream "
                        "consumers on one connection made the broker close it)")
    parser.add_argument("--cancels", type=int, default=100_000,
                        help="cancels a worker starts behind (0: skip that part)")
    parser.add_argument("--burst", type=int, default=10_000,
                        help="cancels published while runs are published")
    parser.add_argument("--runs", type=int, default=100,
                        help="runs published 50 ms apart, quiet and during the burst")
    parser.add_argument("--only-cancels", action="store_true",
                        help="measure the cancel window only, no pool sizes")
    args = parser.parse_args()
    run_benchmark("scale", args, measure_all, report,
                  results_name="scale-cancels" if args.only_cancels else None)


if __name__ == "__main__":
    main()
