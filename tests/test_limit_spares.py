"""Spare slots on the real broker: a worker keeps the slot of its last run of a key
whose limit is far from reached, for its next run, and gives it back for runs that
wait elsewhere (see mq_worker.spares)."""

from __future__ import annotations

import time
from pathlib import Path

import aio_pika
import anyio
import pytest

from mq_worker.topology import limit_queue_name
from tests.helpers import (
    EventLog,
    VHost,
    probe,
    publish_raw,
    run_body,
    running_worker,
    unique,
    until_ready,
)
from tests.test_limits import cli, intervals, most_at_once

pytestmark = pytest.mark.anyio


async def keeps_a_spare(url: str, events: EventLog, tmp_path: Path, routing_key: str,
                        queue: str, free: int) -> bool:
    """Runs of key db, one at a time, until the worker holds a slot after its run ended
    (the broker counts `free` tokens ready of the limit's)."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for _ in range(20):
            body = run_body(probe(tmp_path, sleep=0.05), concurrency_key="db")
            await publish_raw(url, body, routing_key=routing_key)
            await events.wait_terminal([body["id"]], timeout=10)
            # Held for 0.1 s after the run's end is known (a run gives its slot back as
            # it ends): kept. A spare is given back once it has stayed unused for 0.5 s.
            held_since = None
            for _ in range(30):
                declared = await channel.declare_queue(queue, passive=True)
                if declared.declaration_result.message_count != free:
                    held_since = None
                elif held_since is None:
                    held_since = time.monotonic()
                elif time.monotonic() - held_since > 0.1:
                    return True
                await anyio.sleep(0.01)
    return False


async def test_a_spare_slot_kept_by_an_idle_worker_goes_to_a_run_waiting_on_another(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    await cli("limit", "set", "key:db", "4", "--url", vhost.url)
    queue = limit_queue_name("key:db")
    async with running_worker(vhost.url, pool="a", limit=4), \
            running_worker(vhost.url, pool="b", limit=4):
        assert await keeps_a_spare(vhost.url, events, tmp_path, "run.scheduled.a.default",
                                   queue, 3)
        # Four long runs on the other worker: three slots are free, the fourth is the spare.
        long = [run_body(probe(tmp_path, sleep=6), concurrency_key="db") for _ in range(4)]
        for body in long:
            await publish_raw(vhost.url, body, routing_key="run.scheduled.b.default")
        ids = {b["id"] for b in long}
        await events.wait_terminal(ids, timeout=40)
        assert all(events.types(r)[-1] == "run.completed" for r in ids)
        waited = {e.subject for e in events.events if e.data.get("waiting_for") == "key:db"}
        assert len(waited & ids) <= 1, waited  # none, if the spare went back idle first
        # The run that waited got the spare while the three others still ran.
        assert most_at_once(intervals(events.events, ids)) == 4
        # No slot stays with a worker that runs nothing: the limit's 4 tokens are all back.
        await until_ready(vhost.url, {queue: 4}, timeout=10)


async def test_with_spares_in_play_runs_start_in_order_of_arrival_and_within_the_limit(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """Both workers keep spares while the limit is far from reached; then a burst fills
    it: the runs that arrive after it is full wait their turn, and no more than the
    limit ever run."""
    await cli("limit", "set", "key:db", "4", "--url", vhost.url)
    queue = limit_queue_name("key:db")
    async with running_worker(vhost.url, pool="a", limit=6), \
            running_worker(vhost.url, pool="b", limit=6):
        for pool in ("a", "b"):
            assert await keeps_a_spare(vhost.url, events, tmp_path, f"run.scheduled.{pool}.default",
                                       queue, 3)
        burst = [run_body(probe(tmp_path, sleep=2), concurrency_key="db") for _ in range(12)]
        for index, body in enumerate(burst):
            pool = "ab"[index % 2]
            await publish_raw(vhost.url, body, routing_key=f"run.scheduled.{pool}.default")
            await events.wait_for(lambda _, r=body["id"]: events.of(r))  # arrival order
        ids = [b["id"] for b in burst]
        await events.wait_terminal(ids, timeout=60)
        await until_ready(vhost.url, {queue: 4}, timeout=10)
    assert all(events.types(r)[-1] == "run.completed" for r in ids)
    assert most_at_once(intervals(events.events, set(ids))) == 4
    starts = {e.subject: e.time for e in events.events if e.type == "mq_worker.run.submitted"}
    # Woken in order of arrival; runs woken at the same moment (up to the limit's 4)
    # race to their workers, so a run can be overtaken by those only.
    overtaken = [len([later for later in ids[i + 1:] if starts[later] < starts[r]])
                 for i, r in enumerate(ids)]
    assert max(overtaken) < 4, overtaken
    waits = [len([e for e in unique(events.of(r)) if e.data.get("waiting_for")]) for r in ids]
    assert max(waits) == 1, waits  # some waited, none twice
