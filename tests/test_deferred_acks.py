"""Acknowledgements the consumer defers at full capacity, against a real broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from mq_worker import Publisher
from mq_worker.topology import work_queue_name
from tests.helpers import (
    EventLog,
    VHost,
    probe,
    publish_raw,
    queue_stats,
    run_body,
    running_worker,
    started_runs,
    wait_until,
)
from tests.test_pause import cli

pytestmark = pytest.mark.anyio


def ready_and_unacknowledged(vhost: VHost, queue: str) -> tuple[int, int] | None:
    """Only the management API counts the unacknowledged messages of a queue; its
    statistics lag by about 5 s, so a count is news only once it has changed."""
    row = queue_stats(vhost, "messages_ready", "messages_unacknowledged").get(queue, {})
    if "messages_unacknowledged" not in row:
        return None  # no statistics yet
    return int(row["messages_ready"]), int(row["messages_unacknowledged"])


async def test_a_started_run_is_acknowledged_once_its_queue_is_paused(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    # With its only slot taken, the worker defers the acknowledgement of the started
    # run (up to 60 s here): acknowledging would let the broker push a run it has no
    # slot for. Pausing the queue cancels its consumer, so that reason is gone.
    high = work_queue_name("etl", "high")
    body = run_body(probe(tmp_path, sleep=60))
    async with running_worker(vhost.url, pool="etl", queue=["high", "low"], limit=1,
                              ack_grace=60) as worker, Publisher(vhost.url) as publisher:
        await publish_raw(vhost.url, body, routing_key="run.scheduled.etl.high")
        await wait_until(lambda: body["id"] in started_runs(tmp_path), timeout=15)
        await wait_until(lambda: ready_and_unacknowledged(vhost, high) == (0, 1), timeout=20)
        assert worker.free_slots == 0

        await cli("pause", "queue:etl/high", "--url", vhost.url)
        # Seen at 1 before, the statistics' 0 is from after the pause.
        await wait_until(lambda: ready_and_unacknowledged(vhost, high) == (0, 0), timeout=20)
        assert not events.terminal(body["id"])  # acknowledged while it runs, not at its end

        await publisher.cancel(body["id"], pool="etl")
        await events.wait_terminal([body["id"]], timeout=30)
