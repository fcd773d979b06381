"""A stand-in for an aiormq channel in confirm mode, with what `mq_worker.confirmed_batch`
uses of it: the frames it is given wait in its connection's write queue, as in aiormq,
until a test takes them or confirms them."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pamqp import commands as spec

# A basic.publish method frame's exchange, then its routing key's length.
_ROUTING_KEY = re.compile(rb"\x10mq_worker\.events(.)", re.DOTALL)


class BatchChannel:
    """Records each frame batch queued for the socket; confirms on request."""

    number = 1
    max_content_size = 131_072
    publisher_confirms = True
    is_closed = False

    def __init__(self) -> None:
        self.held = asyncio.Lock()
        self.delivery_tag = 0
        self.confirmations: dict[int, asyncio.Future[Any]] = {}
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue()

    @property
    @asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        """As aiormq's: a context manager made on each use, around the channel's lock."""
        async with self.held:
            yield

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def queued_event_types(self) -> list[str]:
        """The event types in the frame batches queued and not yet taken, in order."""
        types = []
        for batch in list(self.write_queue._queue):  # type: ignore[attr-defined]
            for found in _ROUTING_KEY.finditer(batch.payload):
                key = batch.payload[found.end():found.end() + found.group(1)[0]]
                types.append(key.decode().rsplit(".", 1)[-1])
        return types

    def confirm_all(self) -> None:
        """The broker confirms everything published so far."""
        for tag in list(self.confirmations):
            future = self.confirmations.pop(tag)
            if not future.done():
                future.set_result(spec.Basic.Ack(delivery_tag=tag))
