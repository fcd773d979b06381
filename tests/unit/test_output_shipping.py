"""Run output batches on their way to the broker: batches sealed together leave in one
write, each the publish aiormq would have written, in order, and nothing is lost from the
queue before its write is done."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiormq.exceptions
import anyio
import orjson
import pytest
from pamqp import commands as spec
from pamqp import frame
from pamqp.header import ContentHeader

from mq_worker.output import OutputShipper
from tests.helpers.batch_channel import BatchChannel

pytestmark = pytest.mark.anyio


class OutputChannel(BatchChannel):
    """A channel without confirms that declares the output exchange at once; its lock
    refuses a closed channel, as aiormq's does."""

    publisher_confirms = False

    @property
    @asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        if self.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("closed")
        async with self.held:
            yield

    async def exchange_declare(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def get_underlay_channel(self) -> OutputChannel:
        return self


class Connection:
    def __init__(self) -> None:
        self.underlay = OutputChannel()

    async def channel(self, publisher_confirms: bool) -> OutputChannel:
        assert publisher_confirms is False
        return self.underlay


def publishes(payload: bytes) -> list[tuple[str, str, dict[str, Any]]]:
    """(exchange, routing key, body) of each publish in a frame batch."""
    return [(method.exchange, method.routing_key, body)
            for method, _, body in messages(payload)]


def messages(payload: bytes) -> list[tuple[Any, Any, dict[str, Any]]]:
    """(publish method, properties, body) of each publish in a frame batch."""
    found: list[tuple[Any, Any, dict[str, Any]]] = []
    offset = 0
    method: Any = None
    properties: Any = None
    while offset < len(payload):
        consumed, _, value = frame.unmarshal(payload[offset:])
        offset += consumed
        if isinstance(value, spec.Basic.Publish):
            method = value
        elif isinstance(value, ContentHeader):
            properties = value.properties
        elif hasattr(value, "value"):  # a body frame (one per small batch)
            found.append((method, properties, orjson.loads(value.value)))
    return found


async def test_batches_sealed_together_leave_in_one_write_in_order() -> None:
    connection = Connection()
    shipper = OutputShipper(pool="etl", worker="w1")
    runs = [shipper.open(f"run-{i}", "default") for i in range(5)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(shipper.ship_forever, connection)
        runs[0].line("stdout", "hello")
        runs[3].line("stderr", "three")
        runs[3].line("stdout", "four")
        for run in runs:
            run.close()
        queue = connection.underlay.write_queue
        with anyio.fail_after(5):
            written = await queue.get()
        assert queue.empty()
        sent = publishes(written.payload)
        assert [(e, k) for e, k, _ in sent] == [("mq_worker.output", f"output.etl.run-{i}")
                                               for i in range(5)]
        assert [b["eof"] for _, _, b in sent] == [True] * 5
        assert sent[0][2]["lines"] == [{"stream": "stdout", "text": "hello"}]
        assert len(sent[3][2]["lines"]) == 2
        properties = [p for _, p, _ in messages(written.payload)]
        assert {(p.content_type, p.delivery_mode) for p in properties} == {
            ("application/json", 2)}
        assert len({p.message_id for p in properties}) == 5  # one each, as aiormq gave
        assert shipper.stats().pending_bytes > 0  # not counted shipped before it is written
        flushed = asyncio.ensure_future(shipper.flush())
        await asyncio.sleep(0)
        assert not flushed.done()
        written.drain()  # the connection's writer has written it
        with anyio.fail_after(5):
            await flushed
        assert shipper.stats().shipped_lines == 3 and shipper.stats().pending_bytes == 0
        tg.cancel_scope.cancel()


async def test_a_large_backlog_is_cut_into_writes_of_bounded_size() -> None:
    connection = Connection()
    shipper = OutputShipper(pool="etl", worker="w1", batch_bytes=64 * 1024)
    run = shipper.open("run-big", None)
    for i in range(8 * 2048):  # ~8 full batches of 64 KiB
        run.line("stdout", f"{i:05d}" + "x" * 27)
    run.close()
    async with anyio.create_task_group() as tg:
        tg.start_soon(shipper.ship_forever, connection)
        queue = connection.underlay.write_queue
        sequences: list[int] = []
        eof = False
        with anyio.fail_after(5):
            while not eof:
                written = await queue.get()
                assert len(written.payload) <= 256 * 1024 + 64 * 1024  # a batch's frames
                sent = publishes(written.payload)
                sequences += [body["sequence"] for _, _, body in sent]
                eof = sent[-1][2]["eof"]
                written.drain()
        assert sequences == list(range(len(sequences))) and len(sequences) >= 9
        tg.cancel_scope.cancel()


async def test_many_runs_ending_at_once_go_in_writes_of_at_most_64_messages() -> None:
    connection = Connection()
    shipper = OutputShipper(pool="etl", worker="w1")
    for i in range(200):
        run = shipper.open(f"run-{i}", None)
        run.line("stdout", "\x01" * 1000)  # escaped to six bytes each in the body
        run.close()
    async with anyio.create_task_group() as tg:
        tg.start_soon(shipper.ship_forever, connection)
        keys: list[str] = []
        with anyio.fail_after(5):
            while len(keys) < 200:
                written = await connection.underlay.write_queue.get()
                sent = publishes(written.payload)
                assert len(sent) <= 64 and len(written.payload) <= 256 * 1024 + 8192
                keys += [key for _, key, _ in sent]
                written.drain()
        assert keys == [f"output.etl.run-{i}" for i in range(200)]  # line and eof together
        tg.cancel_scope.cancel()


async def test_batches_abandoned_while_their_write_waits_are_not_counted_twice() -> None:
    connection = Connection()
    shipper = OutputShipper(pool="etl", worker="w1")
    first = shipper.open("run-1", None)
    first.line("stdout", "one")
    first.close()
    async with anyio.create_task_group() as tg:
        tg.start_soon(shipper.ship_forever, connection)
        queue = connection.underlay.write_queue
        with anyio.fail_after(5):
            written = await queue.get()
        assert shipper.abandon() == (1, 1)  # a stopping worker gave up waiting
        written.drain()
        second = shipper.open("run-2", None)
        second.close()
        with anyio.fail_after(5):
            again = await queue.get()
        again.drain()
        await shipper.flush()
        assert [key for _, key, _ in publishes(again.payload)] == ["output.etl.run-2"]
        assert shipper.stats().dropped_lines == 1 and shipper.stats().shipped_lines == 0
        tg.cancel_scope.cancel()


async def test_a_closed_channel_fails_the_write_and_keeps_the_batches() -> None:
    connection = Connection()
    connection.underlay.is_closed = True
    shipper = OutputShipper(pool="etl", worker="w1")
    run = shipper.open("run-1", None)
    run.line("stdout", "kept")
    run.close()
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await shipper.ship_forever(connection)
    assert connection.underlay.write_queue.empty()
    assert shipper.stats().pending_bytes > 0  # for the next connection
