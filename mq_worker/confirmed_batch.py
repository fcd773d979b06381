"""Publish a batch of messages on a confirm-mode aiormq channel with one socket write.

aiormq's `basic_publish` hands each message to its writer task separately, and
the writer sends each with a system call of its own: on a loopback connection
the sender pays for the receiver's TCP work too, and the broker reads every
message separately. Here the frames of the whole batch are marshalled into one
write, each message with its delivery tag and confirmation future registered
exactly as `basic_publish` registers them, under the channel's lock, so other
publishers on the channel keep their tags in order. Relies on aiormq's channel
attributes; `supports(channel)` says whether this aiormq has them, else callers
publish one message at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

_NEEDED = ("lock", "delivery_tag", "confirmations", "create_future", "write_queue", "number",
           "_split_body", "publisher_confirms")


@dataclass(frozen=True, slots=True)
class Message:
    exchange: str
    routing_key: str
    body: bytes
    properties: spec.Basic.Properties


def supports(channel: Any) -> bool:
    """True if `channel` is a confirm-mode aiormq channel this module can publish on."""
    return all(hasattr(channel, name) for name in _NEEDED) and bool(channel.publisher_confirms)


async def publish(channel: Any, messages: Sequence[Message]) -> list[asyncio.Future[Any]]:
    """Write `messages` to the broker at once; return their confirmations, in order.

    Each future ends like `basic_publish`'s: a `Basic.Ack`, a `DeliveryError` for a
    nack, or the channel's error when it closes first. If this is cancelled before
    the write is queued, nothing was sent and the channel's tags are as before.
    """
    confirmations: list[asyncio.Future[Any]] = []
    frames: list[Any] = []
    async with channel.lock:
        first_tag = channel.delivery_tag + 1
        try:
            for message in messages:
                channel.delivery_tag += 1
                confirmation = channel.create_future()
                channel.confirmations[channel.delivery_tag] = confirmation
                confirmations.append(confirmation)
                frames.append(spec.Basic.Publish(exchange=message.exchange,
                                                 routing_key=message.routing_key))
                frames.append(ContentHeader(properties=message.properties,
                                            body_size=len(message.body)))
                frames.extend(channel._split_body(message.body))
            await channel.write_queue.put(
                ChannelFrame.marshall(channel_number=channel.number, frames=frames))
        except BaseException:
            # Not queued: the broker never sees these tags; give them back.
            for tag in range(first_tag, channel.delivery_tag + 1):
                channel.confirmations.pop(tag, None)
            channel.delivery_tag = first_tag - 1
            for confirmation in confirmations:
                confirmation.cancel()
            raise
    return confirmations
