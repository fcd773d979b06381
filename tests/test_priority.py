"""Queue priority on the real broker: a worker's free slots go to its first-listed queue
that has runs waiting, and no queue is starved when the worker has fewer slots than queues."""

from __future__ import annotations

from pathlib import Path

import aio_pika
import pytest

from mq_worker import topology
from tests.helpers import (
    EventLog,
    VHost,
    probe,
    publish_raw,
    run_body,
    running_worker,
    unique,
)

pytestmark = pytest.mark.anyio


async def declare_queues(url: str, pool: str, queues: list[str]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        await topology.declare_pool(raw, pool, queues, topology.QueueOptions())


@pytest.mark.parametrize("limit", [1, 2])
async def test_a_worker_with_fewer_slots_than_queues_takes_runs_from_every_queue(
    vhost: VHost, events: EventLog, tmp_path: Path, limit: int
) -> None:
    queues = ["a", "b", "c"]
    async with running_worker(vhost.url, limit=limit, queue=queues):
        for queue in reversed(queues):  # each queue alone while the others are empty
            body = run_body(probe(tmp_path), name=queue)
            await publish_raw(vhost.url, body, routing_key=f"run.scheduled.default.{queue}")
            await events.wait_for(lambda _, run=body["id"]: events.terminal(run), timeout=30)
            assert events.types(body["id"])[-1] == "run.completed"


async def test_the_high_queue_drains_before_the_low_one_with_bounded_inversions(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    limit = 2
    await declare_queues(vhost.url, "default", ["high", "low"])
    low = [run_body(probe(tmp_path, sleep=0.2), name="low") for _ in range(8)]
    high = [run_body(probe(tmp_path, sleep=0.2), name="high") for _ in range(8)]
    for body in low:
        await publish_raw(vhost.url, body, routing_key="run.scheduled.default.low")
    for body in high:
        await publish_raw(vhost.url, body, routing_key="run.scheduled.default.high")
    async with running_worker(vhost.url, limit=limit, queue=["high", "low"]):
        await events.wait_terminal([b["id"] for b in low + high], timeout=60)
    submitted = [e for e in unique(events.events) if e.type == "mq_worker.run.submitted"]
    order = [e.data["queue"] for e in sorted(submitted, key=lambda e: e.time)]
    last_high = max(i for i, queue in enumerate(order) if queue == "high")
    inversions = order[:last_high].count("low")
    # A low run can only start before a high one through a window open on the low queue,
    # and those never exceed the free slots.
    assert inversions <= limit, order
    assert len(order) == 16
