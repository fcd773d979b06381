"""Run output batches on their way to the broker: batches sealed together leave in one
write, each the publish aiormq would have written, in order, and nothing is lost from the
queue before its write is done."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import orjson
import pytest
from pamqp import commands as spec
from pamqp import frame

from mq_worker.output import OutputShipper
from tests.helpers.batch_channel import BatchChannel

pytestmark = pytest.mark.anyio


class OutputChannel(BatchChannel):
    """A channel without confirms that declares the output exchange at once."""

    publisher_confirms = False

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
    found: list[tuple[str, str, dict[str, Any]]] = []
    offset = 0
    method: Any = None
    while offset < len(payload):
        consumed, _, value = frame.unmarshal(payload[offset:])
        offset += consumed
        if isinstance(value, spec.Basic.Publish):
            method = value
        elif hasattr(value, "value"):  # a body frame (one per small batch)
            found.append((method.exchange, method.routing_key, orjson.loads(value.value)))
    return found


async def test_batches_sealed_together_leave_in_one_write_in_order() -> None:
    connection = Connection()
    shipper = OutputShipper(pool="etl", worker="w1")
    runs = [shipper.open(f"run-{i}", "default") for i in range(5)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(shipper.ship_forever, connection)
        runs[0].line("stdout", "hello")
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
        assert shipper.stats().pending_bytes > 0  # not counted shipped before it is written
        flushed = asyncio.ensure_future(shipper.flush())
        await asyncio.sleep(0)
        assert not flushed.done()
        written.drain()  # the connection's writer has written it
        with anyio.fail_after(5):
            await flushed
        assert shipper.stats().shipped_lines == 1 and shipper.stats().pending_bytes == 0
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
                assert len(written.payload) < 2 * 256 * 1024
                sent = publishes(written.payload)
                sequences += [body["sequence"] for _, _, body in sent]
                eof = sent[-1][2]["eof"]
                written.drain()
        assert sequences == list(range(len(sequences))) and len(sequences) >= 9
        tg.cancel_scope.cancel()
