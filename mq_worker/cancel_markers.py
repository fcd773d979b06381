"""Markers on the cancel stream: how a follower knows it has read every earlier message.

A marker is an empty message published to `mq_worker.cancels` through the default
exchange with a header `x-mq-worker-marker` of a fresh id: it lands after every cancel
already in the stream, so a consumer that reads it back has read them all.
"""

from __future__ import annotations

import uuid

import aiormq.abc
import anyio
from pamqp import commands as spec

from mq_worker.topology import CANCELS_STREAM, MARKER_HEADER, STREAM_OFFSET

# The marker's confirmation can be lost when the stream's leader fails; without it
# the session could wait forever. A TimeoutError ends the session: the worker reconnects.
CONFIRM_TIMEOUT = 15.0
# Catching up, a follower that receives nothing at all for this long (not even its
# marker) reads from a position past the stream's end, and starts again from the window.
STALL_SECONDS = 5.0


async def publish(publisher: aiormq.abc.AbstractChannel, marker: str) -> None:
    await publisher.basic_publish(
        b"",
        exchange="",
        routing_key=CANCELS_STREAM,
        properties=spec.Basic.Properties(headers={MARKER_HEADER: marker}),
        timeout=CONFIRM_TIMEOUT,
    )


async def stream_end(
    channel: aiormq.abc.AbstractChannel, publisher: aiormq.abc.AbstractChannel
) -> int | None:
    """The offset of a marker published now at the end of the cancel stream, read from
    the stream's last chunk (None if it does not come)."""
    marker = uuid.uuid4().hex
    found: list[int] = []
    arrived = anyio.Event()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        headers = message.header.properties.headers or {}
        value = headers.get(MARKER_HEADER)
        offset = headers.get(STREAM_OFFSET)
        if value in (marker, marker.encode()) and isinstance(offset, int):
            found.append(offset)
            arrived.set()

    ok = await channel.basic_consume(CANCELS_STREAM, on_message, no_ack=False,
                                     arguments={STREAM_OFFSET: "last"})
    try:
        await publish(publisher, marker)
        with anyio.move_on_after(STALL_SECONDS):
            await arrived.wait()
    finally:
        assert ok.consumer_tag is not None
        await channel.basic_cancel(ok.consumer_tag)
    return found[0] if found else None
