"""Acknowledgements grouped with `multiple`, read off the wire between a worker and the broker."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from mq_worker import topology
from mq_worker.topology import RUNS_EXCHANGE, work_queue_name
from tests.helpers import (
    HOST,
    PORT,
    EventLog,
    VHost,
    probe,
    ready_counts,
    run_body,
    running_worker,
    started_runs,
    until_no_run_left,
)
from tests.proxy import AckFrames, link_proxy

pytestmark = pytest.mark.anyio

QUEUE = work_queue_name("default", "default")


async def publish_all(url: str, bodies: list[dict[str, Any]]) -> None:
    """The pool's queues declared, then `bodies` published as an outside client would
    (plain aio-pika, persistent, confirmed), in order."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare_pool(await channel.get_underlay_channel(), "default",
                                    ["default"], topology.QueueOptions())
        exchange = await channel.get_exchange(RUNS_EXCHANGE)
        for body in bodies:
            await exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="run.scheduled.default.default")


Channel = tuple[int, int]  # (connection, channel): the worker's and its cancel replay's


def settled_by_channel(
    acks: list[tuple[Channel, int, bool]]
) -> dict[Channel, tuple[set[int], int]]:
    """For each channel: the delivery tags its acknowledgements settle, and how many frames."""
    settled: dict[Channel, tuple[set[int], int]] = {}
    for channel, tag, multiple in acks:
        tags, frames = settled.get(channel, (set(), 0))
        tags |= set(range(1, tag + 1)) if multiple else {tag}
        settled[channel] = (tags, frames + 1)
    return settled


@pytest.mark.parametrize("limit", [8, 4])  # windows of 4 and of 2
async def test_runs_started_together_share_an_acknowledgement(
    vhost: VHost, events: EventLog, limit: int
) -> None:
    bodies = [run_body("/bin/true") for _ in range(48)]
    await publish_all(vhost.url, bodies)
    frames = AckFrames()
    async with link_proxy(HOST, PORT, tap=frames.feed) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        async with running_worker(url, limit=limit) as worker:
            await events.wait_terminal([b["id"] for b in bodies], timeout=60)
            await until_no_run_left(vhost.url, [QUEUE], worker)
        assert proxy.connections <= 2  # the worker's, and its cancel replay's
    # Its connection closed, the broker would have made ready again what was not acknowledged.
    assert await ready_counts(vhost.url, [QUEUE]) == {QUEUE: 0}

    assert {events.types(b["id"])[-1] for b in bodies} == {"run.completed"}
    [(tags, ack_frames)] = [v for v in settled_by_channel(frames.acks).values()
                            if max(v[0]) == len(bodies)]
    assert tags == set(range(1, len(bodies) + 1))  # each delivery settled, none twice
    print(f"\n{len(bodies)} runs acknowledged with {ack_frames} basic.ack frames")
    # One frame per run without grouping; runs started together in a window of two or
    # more (half the limit) go at least in pairs.
    assert ack_frames <= len(bodies) * 3 // 4


async def test_a_run_waiting_for_its_start_time_is_not_settled_by_a_later_runs_ack(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    # The held run is the first delivery on the channel: an acknowledgement with
    # `multiple` of any later run would settle it, and the broker would drop it.
    held = run_body(probe(tmp_path), scheduled_start_time=datetime.fromtimestamp(
        time.time() + 10, UTC).isoformat())
    now = [run_body(probe(tmp_path)) for _ in range(12)]
    await publish_all(vhost.url, [held, *now])
    frames = AckFrames()
    async with link_proxy(HOST, PORT, tap=frames.feed) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        async with running_worker(url, limit=4, prefetch_seconds=60) as worker:  # held
            await events.wait_terminal([b["id"] for b in now], timeout=60)
            before_its_start = list(frames.acks)
            assert held["id"] not in started_runs(tmp_path)
            await events.wait_terminal([held["id"]], timeout=60)
            await until_no_run_left(vhost.url, [QUEUE], worker)
        assert proxy.connections <= 2  # the worker's, and its cancel replay's
    assert await ready_counts(vhost.url, [QUEUE]) == {QUEUE: 0}

    assert [e.type for e in events.terminal(held["id"])] == ["mq_worker.run.completed"]
    assert len(started_runs(tmp_path)) == 1 + len(now)
    [channel] = [c for c, (tags, _) in settled_by_channel(frames.acks).items()
                 if tags == set(range(1, 2 + len(now)))]
    assert 1 not in settled_by_channel(before_its_start).get(channel, (set(), 0))[0]
