"""Fewer socket writes on an aiormq connection: a batch of confirmed publishes in one
write, and everything the channels queue in one loop turn written together.

aiormq's `basic_publish` hands each message to its writer task separately, and
the writer sends each with a system call of its own: on a loopback connection
the sender pays for the receiver's TCP work too, and the broker reads every
message separately. Here the frames of the whole batch are encoded
(`mq_worker.publish_frames`) into one write, each message with its delivery tag
and confirmation future registered exactly as `basic_publish` registers them,
under the channel's lock, so other publishers on the channel keep their tags in
order. Relies on aiormq's channel attributes; `supports(channel)` says whether this
aiormq has them, else callers publish one message at a time.

`coalesce_writes` makes the connection's writer take every frame batch queued
when it wakes (acks on one channel, event batches on another, heartbeats) and
write them as one: frames stay in the order they were queued.

`publish_unconfirmed` is the same write for a channel without confirms (run output).

`publish_now` is `publish` in the caller's loop turn, for the outbox's `send_now`:
under the channel's lock if it is free, and written straight to the socket when
nothing is queued ahead (`mq_worker.socket_writes`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from aiormq.abc import ChannelFrame

from mq_worker import socket_writes
from mq_worker.publish_frames import Message, publish_frames

__all__ = ["Message", "coalesce_writes", "publish", "publish_now", "publish_unconfirmed",
           "supports", "supports_unconfirmed"]

_NEEDED = ("lock", "delivery_tag", "confirmations", "create_future", "write_queue", "number",
           "max_content_size", "publisher_confirms")
_NEEDED_UNCONFIRMED = ("lock", "create_future", "write_queue", "number", "max_content_size",
                       "publisher_confirms")


def coalesce_writes(channel: Any) -> bool:
    """Make the writer of `channel`'s connection write all it has queued at once.

    aiormq's writer task takes one frame batch from the connection's write queue
    and sends it before taking the next. Wrapping the queue's `get` hands it all
    batches queued so far as one. Returns False if this aiormq has no such queue;
    True (and no second wrapper) if it is done.
    """
    queue = getattr(channel, "write_queue", None)
    if not isinstance(queue, asyncio.Queue):
        return False
    if "get" in vars(queue):
        return True
    take_one = queue.get

    async def take_all() -> ChannelFrame:
        first: ChannelFrame = await take_one()
        if first.should_close or queue.empty():
            return first
        batches = [first]
        while not queue.empty() and not batches[-1].should_close:
            batches.append(queue.get_nowait())
            queue.task_done()  # the writer marks the one it is given
        return _joined(batches)

    queue.get = take_all  # type: ignore[method-assign]
    return True


def _joined(batches: list[ChannelFrame]) -> ChannelFrame:
    waiting = [b.drain_future for b in batches if b.drain_future is not None]
    drained = None
    if waiting:
        drained = asyncio.get_running_loop().create_future()

        def _drain_each(_: asyncio.Future[Any]) -> None:
            for future in waiting:
                if not future.done():
                    future.set_result(None)

        drained.add_done_callback(_drain_each)
    return ChannelFrame(payload=b"".join(b.payload for b in batches),
                        should_close=batches[-1].should_close, drain_future=drained)


def supports(channel: Any) -> bool:
    """True if `channel` is a confirm-mode aiormq channel this module can publish on."""
    return all(hasattr(channel, name) for name in _NEEDED) and bool(channel.publisher_confirms)


def supports_unconfirmed(channel: Any) -> bool:
    """True if `channel` is an aiormq channel without confirms this module can publish on."""
    return (all(hasattr(channel, name) for name in _NEEDED_UNCONFIRMED)
            and not channel.publisher_confirms)


async def publish_unconfirmed(channel: Any, messages: Sequence[Message]) -> None:
    """Write `messages` in one write, queued under the channel's lock (which raises if the
    channel is closed), as `basic_publish` does; return once the writer has written them."""
    payload = b"".join(publish_frames(channel.number, message, channel.max_content_size)
                       for message in messages)
    async with channel.lock:
        written = channel.create_future()  # the channel's: ends with an error if it closes
        await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False,
                                                   drain_future=written))
    await written


async def publish(channel: Any, messages: Sequence[Message]) -> list[asyncio.Future[Any]]:
    """Write `messages` to the broker at once; return their confirmations, in order.

    Each future ends like `basic_publish`'s: a `Basic.Ack`, a `DeliveryError` for a
    nack, or the channel's error when it closes first. If this is cancelled before
    the write is queued, nothing was sent and the channel's tags are as before.
    """
    async with channel.lock:
        confirmations, payload = _registered(channel, messages)
        try:
            await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        except BaseException:
            _unregistered(channel, confirmations)
            raise
    return confirmations


def publish_now(channel: Any, messages: Sequence[Message]) -> list[asyncio.Future[Any]] | None:
    """`publish` without yielding: the frames are written to the socket in the caller's
    loop turn if nothing is queued ahead of them (`socket_writes`), else queued for the
    connection's writer. None, and nothing sent, if that would have to wait: the channel's
    lock is held (another publish may have taken a tag and wait to queue its frames), the
    channel is closed, or the write queue is full. If the write raises, nothing was sent and
    the channel's tags are as before, as with `publish`."""
    lock = channel.lock
    if channel.write_queue.full() or not _entered_now(lock):
        return None
    try:
        confirmations, payload = _registered(channel, messages)
        try:
            if not socket_writes.write_now(channel, payload):
                channel.write_queue.put_nowait(ChannelFrame(payload=payload,
                                                            should_close=False))
        except BaseException:
            _unregistered(channel, confirmations)
            raise
    finally:
        _exited_now(lock)
    return confirmations


def _entered_now(context: Any) -> bool:
    """Enter the async context manager `context` (the channel's lock) if that takes no
    wait: True if it is entered. Its `__aenter__` is stepped once, here, not in a task;
    one that would wait (the lock is held) or raises (the channel closed) is abandoned."""
    step = context.__aenter__()
    try:
        step.send(None)
    except StopIteration:
        return True
    except Exception:
        return False
    # Waiting for the lock: cancelled as a task would be, it leaves the lock's waiters
    # (closing it instead would leave its waiter queued, and the lock stuck).
    with contextlib.suppress(asyncio.CancelledError, StopIteration):
        step.throw(asyncio.CancelledError())
    return False


def _exited_now(context: Any) -> None:
    """Leave a context entered by `_entered_now` (releasing a lock takes no wait)."""
    step = context.__aexit__(None, None, None)
    try:
        step.send(None)
    except StopIteration:
        return
    raise RuntimeError(f"leaving {context!r} would wait")


def _registered(channel: Any,
                messages: Sequence[Message]) -> tuple[list[asyncio.Future[Any]], bytes]:
    """Each message's delivery tag and confirmation, as `basic_publish` registers them,
    and the frames of them all."""
    confirmations: list[asyncio.Future[Any]] = []
    frames: list[bytes] = []
    try:
        for message in messages:
            frames.append(publish_frames(channel.number, message, channel.max_content_size))
            channel.delivery_tag += 1
            confirmation = channel.create_future()
            channel.confirmations[channel.delivery_tag] = confirmation
            confirmations.append(confirmation)
    except BaseException:
        _unregistered(channel, confirmations)
        raise
    return confirmations, b"".join(frames)


def _unregistered(channel: Any, confirmations: list[asyncio.Future[Any]]) -> None:
    """Not queued: the broker never sees these tags; give them back."""
    first_tag = channel.delivery_tag - len(confirmations) + 1
    for tag in range(first_tag, channel.delivery_tag + 1):
        channel.confirmations.pop(tag, None)
    channel.delivery_tag = first_tag - 1
    for confirmation in confirmations:
        confirmation.cancel()
