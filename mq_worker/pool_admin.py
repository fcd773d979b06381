"""Operators' side of work pool control: pause, resume and shared limits.

Each operation publishes a control message (confirmed) that every worker
follows. Setting a limit also creates the slot tokens it adds; removing one
sends the runs waiting for it back to their work queues.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiormq.abc
import aiormq.exceptions
import anyio
from pamqp import commands as spec

from mq_worker import topology
from mq_worker.broker import TlsOptions, connect, delivery_tag
from mq_worker.control import (
    ControlMessage,
    TokenMessage,
    apply,
    encode,
    new_version,
)
from mq_worker.limits import ControlState, Limit, check_pause_target, check_target, resize
from mq_worker.topology import MARKER_HEADER, QUEUE_HEADER, STREAM_OFFSET, WOKEN_HEADER
from mq_worker.wire_decoding import header_text

_PERSISTENT = 2


@dataclass(frozen=True)
class LimitUsage:
    """A limit as `mq-worker limit ls` shows it."""

    target: str
    limit: int
    in_use: int
    waiting: int


@asynccontextmanager
async def _channel(
    urls: Sequence[str], tls: TlsOptions | None
) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    connection, _ = await connect(urls, name="mq_worker control", tls=tls)
    try:
        channel = await connection.channel(publisher_confirms=True)
        raw = await channel.get_underlay_channel()
        await topology.declare_control_stream(raw)
        yield raw
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await connection.close()


async def read_state(channel: aiormq.abc.AbstractChannel) -> ControlState:
    """The control state now: every control message up to a marker published now."""
    state = ControlState()
    marker = uuid.uuid4().hex
    done = anyio.Event()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        headers = dict(message.header.properties.headers or {})
        await message.channel.basic_ack(delivery_tag(message), wait=False)
        mark = headers.get(MARKER_HEADER)
        if mark is not None:
            if header_text(mark) == marker:
                done.set()
            return
        # Workers log invalid control messages; the state ignores them.
        with contextlib.suppress(ValueError):
            apply(state, ControlMessage.model_validate_json(message.body))

    await channel.basic_qos(prefetch_count=1000)
    consumer = await channel.basic_consume(
        topology.CONTROL_STREAM, on_message, arguments={STREAM_OFFSET: "first"}
    )
    await channel.basic_publish(
        b"", exchange="", routing_key=topology.CONTROL_STREAM,
        properties=spec.Basic.Properties(headers={MARKER_HEADER: marker}),
    )
    with anyio.fail_after(30):
        await done.wait()
    if consumer.consumer_tag is not None:
        await channel.basic_cancel(consumer.consumer_tag)
    return state


async def _publish_control(channel: aiormq.abc.AbstractChannel, message: ControlMessage) -> None:
    await channel.basic_publish(
        encode(message), exchange=topology.RUNS_EXCHANGE,
        routing_key=topology.control_routing_key(message.kind),
        properties=spec.Basic.Properties(content_type=topology.JSON_CONTENT_TYPE,
                                         delivery_mode=_PERSISTENT),
        mandatory=True,
    )


async def pause(urls: Sequence[str], target: str, *, tls: TlsOptions | None = None,
                by: str | None = None, resume: bool = False) -> None:
    """Stop (or with `resume`, restart) intake of a pool or queue on every worker."""
    check_pause_target(target)
    async with _channel(urls, tls) as channel:
        await _publish_control(channel, ControlMessage(
            kind="resume" if resume else "pause", target=target, version=new_version(), by=by))


async def set_limit(urls: Sequence[str], target: str, limit: int, *,
                    tls: TlsOptions | None = None, by: str | None = None) -> None:
    """Limit `target` to `limit` runs at once across every worker of the vhost."""
    check_target(target)
    async with _channel(urls, tls) as channel:
        state = await read_state(channel)
        version = new_version()
        updated, new_numbers = resize(state.limits.get(target), target, limit, version)
        await topology.declare_limit_queues(channel, target)
        await _publish_control(channel, ControlMessage(
            kind="limit", target=target, limit=limit,
            ranges=list(updated.ranges),
            version=version, by=by))
        # Tokens after the control message: a worker that meets a token newer than
        # what it knows keeps it rather than destroying it.
        queue = topology.limit_queue_name(target)
        for number in new_numbers:
            await channel.basic_publish(
                encode(TokenMessage(target=target, number=number, version=version)),
                exchange="", routing_key=queue,
                properties=spec.Basic.Properties(delivery_mode=_PERSISTENT),
                mandatory=True,
            )
        await drop_stale_tokens(channel, updated)
        await wake_waiting(channel, target, len(new_numbers))


async def drop_stale_tokens(channel: aiormq.abc.AbstractChannel, limit: Limit) -> int:
    """Destroy the free tokens a shrunk limit no longer lists (held ones are destroyed by
    their holder when they come back); return how many.

    In one transaction, on a channel of its own: the tokens kept are published again,
    not put back, since workers read a redelivered token as one lost with its holder's
    connection (see SlotRequests.settle); if the commit fails, the broker puts them all
    back as they were."""
    queue = topology.limit_queue_name(limit.target)
    dropped = 0
    tx = await channel.connection.channel(publisher_confirms=False)
    try:
        await tx.tx_select()
        while True:
            message = await tx.basic_get(queue, no_ack=False)
            if not isinstance(message.delivery, spec.Basic.GetOk):
                break
            tag = message.delivery.delivery_tag
            assert tag is not None
            try:
                token = TokenMessage.model_validate_json(message.body)
                valid = limit.valid(token.number, token.version)
            except ValueError:
                valid = False
            if not valid:
                await tx.basic_ack(tag)
                dropped += 1
            elif message.delivery.redelivered:
                # Lost with a holder's connection: it keeps that mark. (Nothing put back
                # or published in this transaction is delivered before the commit.)
                await tx.basic_nack(tag, requeue=True)
            else:
                await tx.basic_ack(tag)
                await tx.basic_publish(message.body, exchange="", routing_key=queue,
                                       properties=spec.Basic.Properties(
                                           delivery_mode=_PERSISTENT))
        await tx.tx_commit()
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(
                aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            await tx.close()
    return dropped


async def remove_limit(urls: Sequence[str], target: str, *,
                       tls: TlsOptions | None = None, by: str | None = None) -> bool:
    """Remove the limit of `target`; its waiting runs go back to their queues. False if none."""
    check_target(target)
    async with _channel(urls, tls) as channel:
        state = await read_state(channel)
        if target not in state.limits:
            return False
        await _publish_control(channel, ControlMessage(
            kind="limit", target=target, limit=None, version=new_version(), by=by))
        await wake_waiting(channel, target, None)
        # The queues stay: a worker that has not yet heard of the removal may still
        # take a token or put a run there (workers send such runs back when they hear
        # of it), and deleting a queue under a worker would close its channel. Tokens
        # left over are destroyed when met, should the limit be set again.
        return True


async def list_limits(urls: Sequence[str], *, tls: TlsOptions | None = None) -> list[LimitUsage]:
    async with _channel(urls, tls) as channel:
        state = await read_state(channel)
        usage = []
        for target, limit in sorted(state.limits.items()):
            free, waiting = await queue_depths(channel, target)
            usage.append(LimitUsage(target, limit.limit, max(0, limit.limit - free), waiting))
        return usage


async def list_paused(urls: Sequence[str], *, tls: TlsOptions | None = None) -> list[str]:
    async with _channel(urls, tls) as channel:
        return sorted((await read_state(channel)).paused)


async def queue_depths(channel: aiormq.abc.AbstractChannel, target: str) -> tuple[int, int]:
    """(free slot tokens, runs waiting) of a limit, as the broker counts them now."""
    counts = []
    for name in (topology.limit_queue_name(target), topology.waiting_queue_name(target)):
        try:
            declared = await channel.queue_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0, 0
        counts.append(int(declared.message_count or 0))
    return counts[0], counts[1]


async def wake_waiting(
    channel: aiormq.abc.AbstractChannel, target: str, count: int | None,
    publisher: aiormq.abc.AbstractChannel | None = None,
) -> int:
    """Send up to `count` (None: all) of the oldest runs waiting for `target` back to their
    work queues, where a worker takes them again; return how many moved.

    `publisher` (default `channel`) must have publisher confirms: a run is acknowledged
    in the waiting queue only once its work queue has it."""
    queue = topology.waiting_queue_name(target)
    moved = 0
    while count is None or moved < count:
        message = await channel.basic_get(queue, no_ack=False)
        if not isinstance(message.delivery, spec.Basic.GetOk):
            break
        tag = message.delivery.delivery_tag
        assert tag is not None
        await _send_back(publisher or channel, message, target)
        await channel.basic_ack(tag)
        moved += 1
    return moved


async def _send_back(
    channel: aiormq.abc.AbstractChannel, message: aiormq.abc.DeliveredMessage, target: str
) -> None:
    properties = message.header.properties
    headers: dict[str, Any] = dict(properties.headers or {})
    work_queue = headers.get(QUEUE_HEADER)
    if isinstance(work_queue, bytes):
        work_queue = work_queue.decode()
    headers[WOKEN_HEADER] = target
    properties.headers = headers
    await channel.basic_publish(message.body, exchange="", routing_key=str(work_queue),
                                properties=properties, mandatory=True)
