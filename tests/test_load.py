"""Load on a real broker: 10,000 runs of /bin/true through two workers of limit 8."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import anyio
import orjson
import psutil
import pytest

from mq_worker.events import TERMINAL_TYPES
from mq_worker.topology import EVENTS_EXCHANGE, RUNS_EXCHANGE, scheduled_routing_key
from tests.helpers import VHost, WorkerProcess, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LIMIT = 8
TRUE = shutil.which("true") or "true"


@dataclass
class Tally:
    """Counts kept as events arrive: a plain list would make every wait quadratic."""

    terminal: Counter[str] = field(default_factory=Counter)
    submitted: Counter[str] = field(default_factory=Counter)
    open_by_worker: Counter[str] = field(default_factory=Counter)
    peak_by_worker: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    redelivered: int = 0
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def add(self, body: bytes) -> None:
        event = orjson.loads(body)
        kind, run_id, source = event["type"], event.get("subject"), event["source"]
        if kind == "mq_worker.run.submitted":
            self.submitted[run_id] += 1
            self.open_by_worker[source] += 1
            self.peak_by_worker[source] = max(self.peak_by_worker[source],
                                              self.open_by_worker[source])
        elif kind in TERMINAL_TYPES:
            self.terminal[run_id] += 1
            self.outcomes[kind] += 1
            if self.submitted[run_id]:
                self.open_by_worker[source] -= 1
        elif kind == "mq_worker.run.pending" and event["data"].get("redelivered"):
            self.redelivered += 1
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_terminal(self, ids: list[str], timeout: float) -> None:
        with anyio.fail_after(timeout):
            while not all(self.terminal[i] for i in ids):
                await self._changed.wait()


@asynccontextmanager
async def tally_of(url: str) -> AsyncIterator[Tally]:
    tally = Tally()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, "topic", durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "mq_worker.run.#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            tally.add(message.body)

        await queue.consume(on_message, no_ack=True)
        yield tally
    finally:
        with anyio.move_on_after(10, shield=True):
            await connection.close()


async def publish_runs(url: str, count: int) -> list[str]:
    """Publish `count` runs of /bin/true with confirms, many in flight at once."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(RUNS_EXCHANGE)
        key = scheduled_routing_key("default", "default")
        window = anyio.Semaphore(200)

        async def publish(run_id: str) -> None:
            async with window:
                body = orjson.dumps({"id": run_id, "job_variables": {"command": TRUE}})
                await exchange.publish(
                    aio_pika.Message(body, content_type="application/json",
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=key)

        async with anyio.create_task_group() as tg:
            for run_id in ids:
                tg.start_soon(publish, run_id)
    return ids


@dataclass(frozen=True)
class Footprint:
    rss_mib: float
    fds: int
    children: list[str]


def footprint(worker: WorkerProcess) -> Footprint:
    process = psutil.Process(worker.process.pid)
    children = [" ".join(c.cmdline()) or c.name() for c in process.children(recursive=True)]
    return Footprint(process.memory_info().rss / 2**20, process.num_fds(), children)


async def settled(worker: WorkerProcess) -> Footprint:
    """The worker's footprint once its runs' processes are all reaped."""
    return await wait_until(lambda: (lambda now: now if all("_guardian" in c for c in
                                                            now.children) else None)(
        footprint(worker)), timeout=30)


@pytest.mark.timeout(900)
async def test_ten_thousand_runs_through_two_workers(
    vhost: VHost, worker_processes: Any
) -> None:
    total = int(os.environ.get("MQ_WORKER_LOAD_RUNS", "10000"))
    first = min(1000, total)
    async with tally_of(vhost.url) as tally:
        workers = [worker_processes(vhost.url, "--limit", str(LIMIT), "--log-level", "warning")
                   for _ in range(2)]
        await wait_until(lambda: len(vhost.consumers("mq_worker.default.default")) == 2,
                         timeout=60)
        began = time.monotonic()
        ids = await publish_runs(vhost.url, first)
        await tally.wait_terminal(ids, timeout=120)
        at_first = [await settled(w) for w in workers]
        first_seconds = time.monotonic() - began

        began = time.monotonic()
        more = await publish_runs(vhost.url, total - first)
        await tally.wait_terminal(more, timeout=600)
        rest_seconds = time.monotonic() - began
        at_total = [await settled(w) for w in workers]
        ids += more

        assert len(set(ids)) == total
        assert not [i for i in ids if tally.terminal[i] != 1], "runs without exactly one end"
        assert sum(tally.terminal.values()) == total
        assert tally.outcomes == {"mq_worker.run.completed": total}
        assert sum(tally.submitted.values()) == total
        assert tally.redelivered == 0
        assert len(tally.peak_by_worker) == 2, "both workers took runs"
        assert max(tally.peak_by_worker.values()) <= LIMIT
        for worker, before, after in zip(workers, at_first, at_total, strict=True):
            assert worker.process.poll() is None
            assert after.children == before.children  # only the guardian: every run reaped
            assert after.fds <= before.fds + 2
            assert after.rss_mib <= before.rss_mib * 1.10, (before, after)
        print(f"\n{first} runs in {first_seconds:.1f} s; {total - first} more in "
              f"{rest_seconds:.1f} s ({(total - first) / rest_seconds:.0f} runs/s); "
              f"peak in flight {dict(tally.peak_by_worker)}; "
              f"RSS MiB at {first}: {[round(f.rss_mib, 1) for f in at_first]}, "
              f"at {total}: {[round(f.rss_mib, 1) for f in at_total]}; "
              f"fds {[f.fds for f in at_first]} -> {[f.fds for f in at_total]}")
