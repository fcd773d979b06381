"""The AMQP edge under hostile or broken input, on a real broker.

Messages whose properties cannot be decoded, publishes the broker returns,
consumers the broker cancels, headers near the frame size, replayed signatures.
One bad message must cost at most that message: no connection loop, no lost run.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiormq
import pytest
from pamqp import commands as spec

from mq_worker.topology import RUNS_EXCHANGE
from mq_worker.workers.process import ProcessWorker
from tests.conftest import (
    EventLog,
    VHost,
    probe,
    run_body,
    running_worker,
    started_runs,
    wait_until,
)

pytestmark = pytest.mark.anyio


class _FarFuture(datetime):
    """A timestamp a client stamped in microseconds: about 10**15 "seconds" on the wire."""

    def timestamp(self) -> float:
        return 10.0**15


POISON_TIME = _FarFuture(2000, 1, 1, tzinfo=UTC)


async def publish_amqp(
    url: str,
    body: bytes,
    *,
    exchange: str = RUNS_EXCHANGE,
    routing_key: str = "run.scheduled.default.default",
    properties: spec.Basic.Properties | None = None,
) -> None:
    """Publish with a raw AMQP client, any properties allowed (confirmed)."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await channel.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                    properties=properties or spec.Basic.Properties())
    finally:
        await connection.close()


def reconnects(worker: ProcessWorker) -> float:
    return worker.metrics.reconnects._value.get()  # type: ignore[attr-defined,no-any-return]


def cancel_body(run_id: Any, reason: str = "test") -> bytes:
    return f'{{"id": "{run_id}", "reason": "{reason}"}}'.encode()


# -- 1. undecodable properties ---------------------------------------------------------


async def test_a_run_with_an_undecodable_timestamp_runs_without_breaking_the_connection(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path))
    header_body = run_body(probe(tmp_path))
    async with running_worker(vhost.url) as worker:
        await publish_amqp(vhost.url, orjson_dumps(body),
                           properties=spec.Basic.Properties(timestamp=POISON_TIME))
        await publish_amqp(vhost.url, orjson_dumps(header_body),
                           properties=spec.Basic.Properties(headers={"sent-at": POISON_TIME}))
        await events.wait_terminal([body["id"], header_body["id"]], timeout=30)
        assert reconnects(worker) == 0
    assert events.types(body["id"])[-1] == "run.completed"
    assert events.types(header_body["id"])[-1] == "run.completed"
    assert len(started_runs(tmp_path)) == 2


async def test_an_undecodable_cancel_costs_only_itself_for_running_and_new_workers(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    long_run = run_body(probe(tmp_path, sleep=60))
    async with running_worker(vhost.url) as worker:
        # The poison comes first in the stream: every worker replays it at start.
        poisoned_id = uuid.uuid4()
        await publish_amqp(vhost.url, cancel_body(poisoned_id), routing_key="run.cancel.default",
                           properties=spec.Basic.Properties(timestamp=POISON_TIME))
        await publish_amqp(vhost.url, orjson_dumps(long_run))
        await wait_until(lambda: long_run["id"] in started_runs(tmp_path), timeout=30)
        await publish_amqp(vhost.url, cancel_body(long_run["id"]),
                           routing_key="run.cancel.default")
        await events.wait_for(lambda _: events.types(long_run["id"])[-1:] == ["run.cancelled"],
                              timeout=30)
        assert reconnects(worker) == 0
        # A worker started after the poison replays it, and still starts.
        async with running_worker(vhost.url) as late:
            assert late._registry.get(uuid.UUID(long_run["id"])) is not None
            assert late._registry.get(poisoned_id) is not None
            assert reconnects(late) == 0


def orjson_dumps(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()


@pytest.fixture
def strict_decoding() -> Any:
    """pamqp's own timestamp decoder, which raises: a frame no decoder could read."""
    from pamqp import decode

    saved = decode.METHODS["timestamp"], decode.TABLE_MAPPING[b"T"]
    decode.METHODS["timestamp"] = decode.TABLE_MAPPING[b"T"] = decode.timestamp
    try:
        yield
    finally:
        decode.METHODS["timestamp"], decode.TABLE_MAPPING[b"T"] = saved


async def test_the_cancel_follower_steps_past_an_offset_it_cannot_decode(
    vhost: VHost, strict_decoding: None
) -> None:
    async with running_worker(vhost.url) as worker:
        await publish_amqp(vhost.url, cancel_body(uuid.uuid4()), routing_key="run.cancel.default")
        await publish_amqp(vhost.url, cancel_body(uuid.uuid4()), routing_key="run.cancel.default",
                           properties=spec.Basic.Properties(timestamp=POISON_TIME))
        after = uuid.uuid4()
        await publish_amqp(vhost.url, cancel_body(after), routing_key="run.cancel.default")
        await wait_until(lambda: worker._registry.get(after) is not None, timeout=30)
        assert worker._cancels.skipped_offsets == 1
