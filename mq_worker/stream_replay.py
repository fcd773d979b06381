"""Reading a stream from an offset up to a message, on a connection of its own, fast.

A worker catching up with a long cancel window reads every message of it
before it takes a run. Through the worker's client that costs tens of
microseconds a message (mq_worker.stream_frames says where), so the catching
up reads a socket of its own: a minimal AMQP 0-9-1 consumer (PLAIN login, TLS
for `amqps`, one channel, basic.qos, basic.consume with `x-stream-offset`)
that parses the frames in bulk and grants credit with one `multiple`
acknowledgement per batch read. `on_delivery` says when to stop (the caller's
marker has come); the connection is then closed and the caller follows the
stream on its usual connection from the next offset.

Anything unusual ends the replay with `ReplayStopped` (or OSError, TimeoutError):
the caller carries on with its usual follower from where this one got to, which
handles every such case as before. A consumer cancelled by the broker (the
stream was deleted) raises `StreamCancelled`.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
from pamqp import commands as spec
from pamqp.base import Frame
from yarl import URL

from mq_worker.stream_frames import Delivery, FrameReader, Method, marshal
from mq_worker.topology import STREAM_OFFSET

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
HANDSHAKE_TIMEOUT = 15.0
CLOSE_TIMEOUT = 2.0
_RECEIVE_BYTES = 1 << 18
_CHANNEL = 1


class ReplayStopped(ConnectionError):
    """The replay connection could not go on; the caller reads on as it usually does."""


class StreamCancelled(ReplayStopped):
    """The broker cancelled the consumer: the stream is gone."""


@dataclass(frozen=True)
class ReplayTarget:
    """Where to read: the broker of the caller's connection, and the stream and offset."""

    url: URL
    vhost: str
    ssl_context: ssl.SSLContext | None
    connection_name: str
    stream: str
    offset: Any  # an x-stream-offset value: an offset, a datetime, "first", ...
    prefetch: int = 2000
    stall_seconds: float = 5.0


async def replay(
    target: ReplayTarget,
    on_delivery: Callable[[Delivery], bool],
    after_consume: Callable[[], Awaitable[None]],
) -> int:
    """Deliver the stream's messages from `target.offset` to `on_delivery` until it returns
    True; `after_consume` is awaited once the consumer is registered. Returns the number
    of messages delivered. Raises TimeoutError when nothing comes for `stall_seconds`."""
    stream = await _open(target)
    connection = _Connection(stream, FrameReader())
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            await connection.handshake(target)
        await after_consume()
        return await connection.consume_until(on_delivery, target.stall_seconds)
    finally:
        with anyio.CancelScope(shield=True):
            await connection.close()


async def _open(target: ReplayTarget) -> anyio.abc.ByteStream:
    host, port = target.url.host or "localhost", target.url.port or 5672
    with anyio.fail_after(HANDSHAKE_TIMEOUT):
        if target.url.scheme == "amqps":
            context = target.ssl_context or ssl.create_default_context()
            return await anyio.connect_tcp(host, port, ssl_context=context, tls_hostname=host)
        return await anyio.connect_tcp(host, port)


class _Connection:
    def __init__(self, stream: anyio.abc.ByteStream, reader: FrameReader) -> None:
        self._stream = stream
        self._reader = reader
        self._items: list[Delivery | Method] = []
        self._open = False

    async def handshake(self, target: ReplayTarget) -> None:
        await self._stream.send(PROTOCOL_HEADER)
        await self._expect(spec.Connection.Start)
        user = target.url.user if target.url.user is not None else "guest"
        password = target.url.password if target.url.password is not None else "guest"
        await self._send(spec.Connection.StartOk(
            client_properties={
                "connection_name": target.connection_name, "product": "mq_worker",
                # Without it the broker would not tell us that the stream was deleted.
                "capabilities": {"consumer_cancel_notify": True},
            },
            mechanism="PLAIN", response=f"\0{user}\0{password}", locale="en_US"))
        tune = await self._expect(spec.Connection.Tune)
        assert isinstance(tune, spec.Connection.Tune)
        # No heartbeats: a silence longer than stall_seconds ends the replay anyway.
        await self._send(spec.Connection.TuneOk(channel_max=1, frame_max=tune.frame_max,
                                                heartbeat=0))
        await self._send(spec.Connection.Open(virtual_host=target.vhost))
        await self._expect(spec.Connection.OpenOk)
        self._open = True
        await self._send(spec.Channel.Open(), _CHANNEL)
        await self._expect(spec.Channel.OpenOk)
        await self._send(spec.Basic.Qos(prefetch_count=target.prefetch), _CHANNEL)
        await self._expect(spec.Basic.QosOk)
        await self._send(spec.Basic.Consume(
            queue=target.stream, arguments={STREAM_OFFSET: target.offset}), _CHANNEL)
        await self._expect(spec.Basic.ConsumeOk)

    async def consume_until(self, on_delivery: Callable[[Delivery], bool],
                            stall_seconds: float) -> int:
        delivered = 0
        items, self._items = self._items, []  # what came with basic.consume-ok
        while True:
            if not items:
                with anyio.fail_after(stall_seconds):
                    items = await self._receive()
            last_tag = 0
            for item in items:
                if isinstance(item, Method):
                    self._raise_on(item.method)
                    continue
                delivered += 1
                last_tag = item.delivery_tag
                if on_delivery(item):
                    return delivered
            if last_tag:
                # A stream's acknowledgements only grant credit: one for the whole batch.
                await self._send(spec.Basic.Ack(delivery_tag=last_tag, multiple=True), _CHANNEL)
            items = []

    async def close(self) -> None:
        try:
            if self._open:
                self._open = False
                with anyio.move_on_after(CLOSE_TIMEOUT):
                    await self._send(spec.Connection.Close(
                        reply_code=200, reply_text="done", class_id=0, method_id=0))
                    while True:
                        for item in await self._receive():
                            if isinstance(item, Method) and isinstance(
                                    item.method, spec.Connection.CloseOk | spec.Connection.Close):
                                return
        except (OSError, ValueError, ReplayStopped):
            pass  # closing as well as we can: the socket goes in any case
        finally:
            await self._stream.aclose()

    async def _expect(self, kind: type[Frame]) -> Frame:
        while True:
            while self._items:
                item = self._items.pop(0)
                if isinstance(item, Method):
                    if isinstance(item.method, kind):
                        return item.method
                    self._raise_on(item.method)
                # A delivery or another method before the answer: nothing we asked for.
            self._items = await self._receive()

    async def _receive(self) -> list[Delivery | Method]:
        try:
            data = await self._stream.receive(_RECEIVE_BYTES)
        except anyio.EndOfStream:
            raise ReplayStopped("the broker closed the replay connection") from None
        except anyio.BrokenResourceError as exc:
            raise ReplayStopped(f"the replay connection broke: {exc}") from exc
        return self._reader.feed(data)

    async def _send(self, method: Frame, channel: int = 0) -> None:
        try:
            await self._stream.send(marshal(method, channel))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise ReplayStopped(f"the replay connection broke: {exc}") from exc

    def _raise_on(self, method: Frame) -> None:
        """Raise for a method that ends the replay; let others (basic.qos-ok...) pass."""
        if isinstance(method, spec.Basic.Cancel):
            raise StreamCancelled("the broker cancelled the stream's consumer")
        if isinstance(method, spec.Connection.Close | spec.Channel.Close):
            if isinstance(method, spec.Connection.Close):
                self._open = False  # nothing to close any more
            raise ReplayStopped(f"the broker closed the replay: {method.reply_code} "
                                f"{method.reply_text}")
