"""A TCP proxy for tests that cuts and restores the link between a client and the broker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import anyio.abc
from anyio.abc import SocketStream


class LinkProxy:
    """Forwards 127.0.0.1:<port> to the broker until cut; refuses connections while cut."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
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
        async with client:
            try:
                upstream = await anyio.connect_tcp(*self.upstream)
            except OSError:
                return
            link = _Link()
            self._open.append(link)
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(_pump, client, upstream, tg)
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
                link: _Link | None = None) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                             anyio.ClosedResourceError, OSError):
        async for chunk in source:
            if link is None or not link.frozen:
                await sink.send(chunk)
    tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def link_proxy(host: str, port: int) -> AsyncIterator[LinkProxy]:
    proxy = LinkProxy(host, port)
    async with anyio.create_task_group() as tg:
        await proxy.start(tg)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()
