"""Pause and resume of a pool or a queue across workers, through the installed CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from mq_worker.topology import work_queue_name
from tests.helpers import (
    EventLog,
    VHost,
    consumer_count,
    probe,
    publish_raw,
    ready_counts,
    run_body,
    running_worker,
    started_runs,
    until_consumers,
    until_ready,
)
from tests.test_cli import mq_worker

pytestmark = pytest.mark.anyio


async def cli(*args: str) -> str:
    result = await mq_worker(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_pausing_a_pool_stops_intake_on_every_worker_and_resume_restarts_it(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    queue = work_queue_name("etl", "default")
    async with running_worker(vhost.url, pool="etl", limit=2) as one, \
            running_worker(vhost.url, pool="etl", limit=2) as two:
        long = run_body(probe(tmp_path, sleep=4))
        await publish_raw(vhost.url, long, routing_key="run.scheduled.etl.default")
        await events.wait_for(lambda _: "run.submitted" in events.types(long["id"]))

        assert "pool:etl: paused" in await cli("pause", "pool:etl", "--url", vhost.url)
        await until_consumers(vhost.url, queue, 0, timeout=10)
        waiting = [run_body(probe(tmp_path)) for _ in range(4)]
        for body in waiting:
            await publish_raw(vhost.url, body, routing_key="run.scheduled.etl.default")
        await until_ready(vhost.url, {queue: 4}, timeout=10)
        # The run already running goes on and completes while the pool is paused.
        await events.wait_for(lambda _: events.terminal(long["id"]), timeout=15)
        assert events.types(long["id"])[-1] == "run.completed"
        # Still all there, and with no consumer none can be delivered and unacknowledged.
        assert await ready_counts(vhost.url, [queue]) == {queue: 4}
        assert await consumer_count(vhost.url, queue) == 0
        assert not any(body["id"] in started_runs(tmp_path) for body in waiting)
        assert sorted(one.pool_control.paused_targets()) == ["pool:etl"]
        assert sorted(two.pool_control.paused_targets()) == ["pool:etl"]
        assert (await cli("pause", "--url", vhost.url)).split() == ["pool:etl"]
        assert b'mq_worker_paused{target="pool:etl"} 1.0' in one.metrics.render()
        assert "paused: pool:etl" in await cli("status", "--url", vhost.url, "--pool", "etl")

        assert "resumed" in await cli("resume", "pool:etl", "--url", vhost.url)
        await events.wait_terminal([b["id"] for b in waiting], timeout=20)
    ran_on = {e.data["worker"] for e in events.events if e.type == "mq_worker.run.submitted"}
    assert ran_on <= {one.name, two.name}


async def test_pausing_one_queue_leaves_the_other_queues_of_the_worker_served(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    async with running_worker(vhost.url, pool="etl", queue=["high", "low"], limit=2):
        await cli("pause", "queue:etl/low", "--url", vhost.url)
        low_queue = work_queue_name("etl", "low")
        await until_consumers(vhost.url, low_queue, 0, timeout=10)
        low = run_body(probe(tmp_path))
        high = run_body(probe(tmp_path))
        await publish_raw(vhost.url, low, routing_key="run.scheduled.etl.low")
        await publish_raw(vhost.url, high, routing_key="run.scheduled.etl.high")
        await events.wait_terminal([high["id"]], timeout=15)
        assert await ready_counts(vhost.url, [low_queue]) == {low_queue: 1}
        assert not events.of(low["id"]) and await consumer_count(vhost.url, low_queue) == 0
        await cli("resume", "queue:etl/low", "--url", vhost.url)
        await events.wait_terminal([low["id"]], timeout=15)


async def test_a_worker_started_while_its_pool_is_paused_takes_nothing_until_resumed(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    await cli("pause", "pool:late", "--url", vhost.url)
    body = run_body(probe(tmp_path))
    async with running_worker(vhost.url, pool="late") as worker:
        assert worker.pool_control.paused_targets() == ["pool:late"]
        queue = work_queue_name("late", "default")
        await publish_raw(vhost.url, body, routing_key="run.scheduled.late.default")
        await until_ready(vhost.url, {queue: 1}, timeout=10)
        assert await consumer_count(vhost.url, queue) == 0 and not events.of(body["id"])
        await cli("resume", "pool:late", "--url", vhost.url)
        await events.wait_terminal([body["id"]], timeout=15)


async def test_pause_refuses_a_key_target_and_a_malformed_one(vhost: VHost) -> None:
    for target in ("key:tag:x", "queue:etl"):
        result = await mq_worker("pause", target, "--url", vhost.url)
        assert result.returncode == 2 and "target" in result.stderr, (target, result.stderr)
