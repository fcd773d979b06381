"""Ceilings: what a bare loop does on this machine with nothing of mq_worker in it.

    .venv/bin/python -m benchmarks.ceiling spawn --method pidfd --concurrency 8 --count 3000
    .venv/bin/python -m benchmarks.ceiling amqp --prefetch 8 --count 5000 [--events 3]

`spawn` starts /bin/true `count` times, `concurrency` at a time, and waits for each exit:

* default: asyncio.create_subprocess_exec with the default child watcher (a thread per child
  on Python 3.11);
* pidfd: the same with asyncio.PidfdChildWatcher;
* uvloop: asyncio.create_subprocess_exec under uvloop (libuv's SIGCHLD handling);
* popen-pidfd: subprocess.Popen, then a pidfd watched by the event loop (what mq_worker's
  process infrastructure does), under uvloop.

`amqp` fills a quorum queue (the work queue's arguments) with run messages, then consumes and
acknowledges them with plain aio-pika under uvloop; with `--events N` it also publishes N
confirmed events per message, as a worker does (pending, submitted, completed).

`amqp-latency` publishes one message at a time at `rate` per second to a quorum (classic,
stream) queue and times publish -> delivered to a plain aio-pika consumer (prefetch 8, under
uvloop): the broker's part of a run's start (or, for a stream, of a cancel). `spawn-latency`
starts the probe (benchmarks/probe.c) at `rate` per second with subprocess.Popen from an event
loop and times the call -> the probe's first instruction: the operating system's part.

Each prints one JSON line; `throughput` and `latency` run them in processes of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import uvloop

from benchmarks._amqp import new_id
from benchmarks._broker import vhost
from benchmarks._paths import PYTHON, ROOT
from benchmarks._probe import ProbeLog, probe_command, run_body
from benchmarks._report import summarize_ms
from benchmarks._runner import command_line

TRUE = shutil.which("true") or "true"
WORK_QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-delivery-limit": 20,
    "x-dead-letter-exchange": "",
    "x-dead-letter-routing-key": "ceiling.dead",
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


async def _spawn_loop(count: int, concurrency: int, spawn: Callable[[], Awaitable[None]]) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        try:
            await spawn()
        finally:
            gate.release()

    tasks = []
    began = time.perf_counter()
    for _ in range(count):
        await gate.acquire()
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    return count / (time.perf_counter() - began)


async def _asyncio_spawn() -> None:
    process = await asyncio.create_subprocess_exec(
        TRUE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    await process.wait()


async def _popen_pidfd_spawn() -> None:
    # Deliberately blocking, as mq_worker's start_process is: Popen returns once exec'd.
    await _popen_pidfd(subprocess.Popen(  # noqa: ASYNC220
        [TRUE], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=True, process_group=0,
    ))


def spawn_rate(method: str, concurrency: int, count: int) -> float:
    warmup = min(200, count)
    if method in ("default", "pidfd"):
        if method == "pidfd":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                asyncio.set_child_watcher(asyncio.PidfdChildWatcher())

        async def main() -> float:
            if method == "pidfd":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    asyncio.get_child_watcher().attach_loop(asyncio.get_running_loop())
            await _spawn_loop(warmup, concurrency, _asyncio_spawn)
            return await _spawn_loop(count, concurrency, _asyncio_spawn)

        return asyncio.run(main())
    spawn = _asyncio_spawn if method == "uvloop" else _popen_pidfd_spawn

    async def main_uvloop() -> float:
        await _spawn_loop(warmup, concurrency, spawn)
        return await _spawn_loop(count, concurrency, spawn)

    return uvloop.run(main_uvloop())


async def amqp_rate(url: str, prefetch: int, count: int, events: int) -> dict[str, float]:
    connection = await aio_pika.connect(url)
    async with connection:
        publish = await connection.channel(publisher_confirms=True)
        queue = await publish.declare_queue("ceiling.work", durable=True,
                                            arguments=WORK_QUEUE_ARGUMENTS)
        events_exchange = await publish.declare_exchange(
            "ceiling.events", aio_pika.ExchangeType.TOPIC, durable=True)
        sink = await publish.declare_queue("ceiling.sink", exclusive=True)
        await sink.bind(events_exchange, routing_key="#")
        gate = asyncio.Semaphore(256)

        async def put(body: bytes) -> None:
            try:
                await publish.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue.name)
            finally:
                gate.release()

        tasks = []
        for _ in range(count):
            await gate.acquire()
            tasks.append(asyncio.ensure_future(put(run_body(new_id(), TRUE))))
        await asyncio.gather(*tasks)

        consume = await connection.channel()
        await consume.set_qos(prefetch_count=prefetch)
        work = await consume.get_queue(queue.name)
        done = asyncio.Event()
        seen = 0
        first = last = 0.0
        pending: set[asyncio.Future[Any]] = set()

        async def emit() -> None:
            for _ in range(events):
                event = aio_pika.Message(b'{"type": "x"}',
                                         delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await events_exchange.publish(event, routing_key="mq_worker.run.x")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen, first, last
            if not seen:
                first = time.perf_counter()
            seen += 1
            if events:
                future = asyncio.ensure_future(emit())
                pending.add(future)
                future.add_done_callback(pending.discard)
            await message.ack()
            if seen == count:
                last = time.perf_counter()
                done.set()

        await work.consume(on_message)
        await done.wait()
        if pending:
            await asyncio.gather(*pending)
        finished = time.perf_counter()
        return {"rate": (count - 1) / (last - first) if last > first else 0.0,
                "rate_with_events_confirmed": count / (finished - first)}


async def amqp_latency(url: str, queue_type: str, rate: float, count: int) -> list[float]:
    connection = await aio_pika.connect(url)
    async with connection:
        publish = await connection.channel(publisher_confirms=True)
        arguments: dict[str, Any] = {
            "quorum": WORK_QUEUE_ARGUMENTS, "classic": {}, "stream": {"x-queue-type": "stream"},
        }[queue_type]
        queue = await publish.declare_queue(f"ceiling.latency.{queue_type}", durable=True,
                                            arguments=arguments)
        consume = await connection.channel()
        await consume.set_qos(prefetch_count=8)
        received: dict[str, float] = {}
        waiters: dict[str, asyncio.Future[None]] = {}

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            key = message.body.decode()
            received[key] = time.time()
            await message.ack()
            waiter = waiters.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        await (await consume.get_queue(queue.name)).consume(
            on_message, arguments={"x-stream-offset": "next"} if queue_type == "stream" else None)
        sent: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        start = time.monotonic() + 0.05
        for i in range(count + 20):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            key = new_id()
            waiters[key] = loop.create_future()
            sent[key] = time.time()
            await publish.default_exchange.publish(
                aio_pika.Message(key.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name)
        await asyncio.wait_for(asyncio.gather(*waiters.values()), 30)
        return [received[k] - sent[k] for k in list(sent)[20:]]


def spawn_latency(rate: float, count: int) -> list[float]:
    probe = probe_command()
    with tempfile.TemporaryDirectory(prefix="mqw-spawn-") as tmp:
        log = ProbeLog(Path(tmp) / "probe.log")
        sent: dict[str, float] = {}

        async def main() -> None:
            start = time.monotonic() + 0.05
            for i in range(count + 20):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                key = new_id()
                env = {**os.environ, "MQ_WORKER_RUN_ID": key}
                sent[key] = time.time()
                await _popen_pidfd(subprocess.Popen(  # noqa: ASYNC220
                    [probe, str(log.path)], env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                    process_group=0,
                ))

        uvloop.run(main())
        log.read()
        return [log.started[k] - sent[k] for k in list(sent)[20:]]


async def _popen_pidfd(popen: subprocess.Popen[bytes]) -> None:
    fd = os.pidfd_open(popen.pid)
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, exited.set_result, None)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    popen.wait()


def run_ceiling(args: list[str], timeout: float = 300.0) -> dict[str, Any]:
    """Run `python -m benchmarks.ceiling ARGS` in a process of its own; its JSON result."""
    out = subprocess.run([PYTHON, "-m", "benchmarks.ceiling", *args], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=timeout).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = command_line(__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    spawn = sub.add_parser("spawn")
    spawn.add_argument("--method", choices=["default", "pidfd", "uvloop", "popen-pidfd"],
                       default="pidfd")
    spawn.add_argument("--concurrency", type=int, default=8)
    spawn.add_argument("--count", type=int, default=3000)
    amqp = sub.add_parser("amqp")
    amqp.add_argument("--prefetch", type=int, default=8)
    amqp.add_argument("--count", type=int, default=5000)
    amqp.add_argument("--events", type=int, default=0)
    amqp.add_argument("--url", help="a vhost to use (default: a new one)")
    amqp_lat = sub.add_parser("amqp-latency")
    amqp_lat.add_argument("--queue-type", choices=["quorum", "classic", "stream"],
                          default="quorum")
    amqp_lat.add_argument("--rate", type=float, default=50.0)
    amqp_lat.add_argument("--count", type=int, default=500)
    spawn_lat = sub.add_parser("spawn-latency")
    spawn_lat.add_argument("--rate", type=float, default=50.0)
    spawn_lat.add_argument("--count", type=int, default=500)
    args = parser.parse_args()
    if args.kind == "amqp-latency":
        with vhost("ceiling") as host:
            samples = uvloop.run(amqp_latency(host.url, args.queue_type, args.rate, args.count))
        print(json.dumps({"kind": "amqp-latency", "queue_type": args.queue_type,
                          "rate": args.rate, "latency": summarize_ms(samples)}))
        return
    if args.kind == "spawn-latency":
        samples = spawn_latency(args.rate, args.count)
        print(json.dumps({"kind": "spawn-latency", "rate": args.rate,
                          "latency": summarize_ms(samples)}))
        return
    if args.kind == "spawn":
        rate = spawn_rate(args.method, args.concurrency, args.count)
        print(json.dumps({"kind": "spawn", "method": args.method,
                          "concurrency": args.concurrency, "count": args.count, "rate": rate}))
        return
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(vhost("ceiling")).url
        result = uvloop.run(amqp_rate(url, args.prefetch, args.count, args.events))
    print(json.dumps({"kind": "amqp", "prefetch": args.prefetch, "count": args.count,
                      "events": args.events, **result}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
