"""Writing frames to a connection's socket in the caller's loop turn, when nothing is
queued ahead of them.

aiormq writes a connection's frames from its writer task: what a task queues is sent on
the writer's next turn, after every task woken before it has run. For the events a run's
start produces that was 0.25-0.45 ms on the way to a subscriber (docs/benchmarks.md).
The worker's connections (`KeepingConnection`) give aiormq a transport factory, aiormq's
own extension point, that keeps each connection's stream writer; `write_now` writes to it
directly when the connection's write queue is empty. Every frame queued before has then
been written already (aiormq's writer takes a batch from the queue and writes it in the
same turn), and every frame queued later follows: the order on the wire is the order of
the calls.
"""

from __future__ import annotations

import asyncio
from typing import Any
from weakref import WeakKeyDictionary

import aio_pika
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

__all__ = ["KeepingConnection", "KeepingWriter", "write_now", "writer_of"]

# aiormq connection -> its socket's stream writer.
_writers: WeakKeyDictionary[Any, asyncio.StreamWriter] = WeakKeyDictionary()


class KeepingWriter(TransportFactory):
    """aiormq's TCP or TLS transport (as it would choose by the scheme); each connection's
    writer is kept for `write_now` once aiormq has made the connection with it."""

    async def create(self, url: URL,
                     **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        inner = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await inner.create(url, **kwargs)
        self.writer = writer
        return reader, writer


class KeepingConnection(aio_pika.Connection):
    """An aio-pika connection whose aiormq connection's writer `write_now` can use."""

    def __init__(self, url: URL, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._keeping = KeepingWriter()
        self.kwargs["transport_factory"] = self._keeping

    async def connect(self, timeout: float | int | None = None) -> None:
        await super().connect(timeout)
        writer = getattr(self._keeping, "writer", None)
        if self.transport is not None and writer is not None:
            _writers[self.transport.connection] = writer


def writer_of(channel: Any) -> asyncio.StreamWriter | None:
    """The stream writer of `channel`'s connection, if it was made by a KeepingConnection."""
    connection = getattr(channel, "connection", None)
    return _writers.get(connection) if connection is not None else None


def write_now(channel: Any, payload: bytes) -> bool:
    """Write `payload` to the socket of `channel`'s connection now, if nothing is queued
    for it and its socket has taken everything written so far; else False, and the
    caller queues it for aiormq's writer."""
    writer = writer_of(channel)
    if writer is None or writer.is_closing() or not channel.write_queue.empty():
        return False
    if channel.connection.is_closed or writer.transport.get_write_buffer_size():
        return False
    writer.write(payload)
    return True
