"""A TCP proxy for tests that cuts and restores the link between a client and the broker."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anyio.abc import SocketStream


class LinkProxy:
    """Forwards 127.0.0.1:<port> to the broker until cut; refuses connections while cut."""

    def __init__(self, upstream_host: str, upstream_port: int,
                 tap: Callable[[int, bytes], None] | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.tap = tap  # sees what clients send, as it passes, with the connection's number
        self.port = 0
        self.connections = 0
        self._scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._open: list[_Link] = []

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(
            local_host="127.0.0.1", local_port=self.port, reuse_port=False
        )
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        with anyio.CancelScope() as scope:
            self._scope = scope
            async with listener, anyio.create_task_group() as tg:
                task_status.started()
                await listener.serve(self._forward, task_group=tg)

    async def _forward(self, client: SocketStream) -> None:
        self.connections += 1
        number = self.connections
        async with client:
            try:
                upstream = await anyio.connect_tcp(*self.upstream)
            except OSError:
                return
            link = _Link()
            self._open.append(link)
            async with upstream, anyio.create_task_group() as tg:
                tap = self.tap
                tg.start_soon(_pump, client, upstream, tg, None,
                              None if tap is None else (lambda chunk: tap(number, chunk)))
                tg.start_soon(_pump, upstream, client, tg, link)

    def freeze(self) -> None:
        """From now on, drop what the broker sends on the open connections (they stay open).

        Connections made later are not affected: a lost confirm on an open channel."""
        for link in self._open:
            link.frozen = True

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        await tg.start(self._serve)

    def cut(self) -> None:
        """Close every proxied connection and stop listening."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    async def restore(self) -> None:
        """Listen again on the same port."""
        assert self._tg is not None
        await self._tg.start(self._serve)


class _Link:
    frozen = False


async def _pump(source: SocketStream, sink: SocketStream, tg: anyio.abc.TaskGroup,
                link: _Link | None = None, tap: Callable[[bytes], None] | None = None) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                             anyio.ClosedResourceError, OSError):
        async for chunk in source:
            if tap is not None:
                tap(chunk)
            if link is None or not link.frozen:
                await sink.send(chunk)
    tg.cancel_scope.cancel()


@dataclass
class AckFrames:
    """The `basic.ack` frames client connections send, read off the wire:
    ((connection, channel), delivery tag, multiple), in order."""

    acks: list[tuple[tuple[int, int], int, bool]] = field(default_factory=list)
    _buffers: dict[int, bytearray] = field(default_factory=dict)

    def feed(self, connection: int, chunk: bytes) -> None:
        buffer = self._buffers.setdefault(connection, bytearray())
        buffer += chunk
        if buffer.startswith(b"AMQP"):
            del buffer[:8]  # the protocol header
        while len(buffer) >= 7:
            kind, channel, size = struct.unpack_from(">BHI", buffer)
            if len(buffer) < 7 + size + 1:
                return
            payload = bytes(buffer[7:7 + size])
            del buffer[:7 + size + 1]
            if kind == 1 and payload[:4] == _BASIC_ACK:
                tag, bits = struct.unpack_from(">QB", payload, 4)
                self.acks.append(((connection, channel), tag, bool(bits & 1)))


_BASIC_ACK = struct.pack(">HH", 60, 80)


@contextlib.asynccontextmanager
async def link_proxy(host: str, port: int,
                     tap: Callable[[int, bytes], None] | None = None
                     ) -> AsyncIterator[LinkProxy]:
    proxy = LinkProxy(host, port, tap)
    async with anyio.create_task_group() as tg:
        await proxy.start(tg)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()
