"""Settling a channel's deliveries: acknowledgements grouped per loop turn, give-backs.

Acknowledgements are sent once per loop turn, grouped: one `basic.ack` with
`multiple` covers every delivery tag up to the highest one due, provided no
delivery at or below it is still unsettled on the channel (being handled, held
for its start time, or waiting for its acknowledgement to fit). Tags above such
a delivery are acknowledged one by one. The consumer's window counts an
acknowledgement when it is decided, before it is written: until then the broker
may send fewer messages than counted, never more. A reject or give-back of a
lower tag is written before the group that follows it, so `multiple` never
settles it.

The arithmetic of the group is `grouped_acks`, which has no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Set

import aiormq
import aiormq.abc
import anyio

from mq_worker.delivery import Delivery

__all__ = ["AckWriter", "grouped_acks"]


class AckWriter:
    """Writes the settlements a consumer decides, never covering a delivery in hand.

    `unsettled` is the consumer's own set of deliveries in hand, read, never changed.
    """

    def __init__(self, unsettled: Set[Delivery]) -> None:
        self._unsettled = unsettled
        self._due: list[Delivery] = []
        self._wanted = anyio.Event()
        # Deliveries whose reject or give-back is being written: a group stays below them.
        self._giving_back: set[Delivery] = set()
        self.frames = 0  # basic.ack frames written; one may acknowledge several deliveries

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge `delivery` once this loop turn is over."""
        self._due.append(delivery)
        self._wanted.set()

    async def give_back(self, delivery: Delivery, *, failed: bool) -> None:
        """Return `delivery` to its queue: a reject if its handling failed, else a nack."""
        self._giving_back.add(delivery)
        try:
            if failed:
                await delivery.channel.basic_reject(delivery.delivery_tag, requeue=True, wait=False)
            else:
                await delivery.channel.basic_nack(delivery.delivery_tag, requeue=True, wait=False)
        except (aiormq.exceptions.AMQPError, RuntimeError):
            delivery.lost.set()
        finally:
            self._giving_back.discard(delivery)

    async def write_forever(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Write the acknowledgements decided in a loop turn once that turn is over."""
        while True:
            await self._wanted.wait()
            self._wanted = anyio.Event()
            due, self._due = self._due, []
            group, singles = grouped_acks(
                sorted(d.delivery_tag for d in due if d.channel is channel),
                self._lowest_in_hand(channel))
            try:
                if group is not None:
                    self.frames += 1
                    await channel.basic_ack(group, multiple=True, wait=False)
                for tag in singles:
                    self.frames += 1
                    await channel.basic_ack(tag, wait=False)
            except (aiormq.exceptions.AMQPError, RuntimeError):
                # The channel is closing: the broker takes these messages back.
                for delivery in due:
                    delivery.lost.set()
            for delivery in due:
                if delivery.channel is not channel:
                    delivery.lost.set()

    def lose_all(self) -> None:
        """The channel is gone: every acknowledgement not yet written is lost with it."""
        for delivery in self._due:
            delivery.lost.set()
        self._due.clear()
        self._giving_back.clear()

    def _lowest_in_hand(self, channel: aiormq.abc.AbstractChannel) -> float:
        """The lowest tag on `channel` a grouped acknowledgement must not reach."""
        in_hand = itertools.chain(self._unsettled, self._giving_back)
        return min((d.delivery_tag for d in in_hand if d.channel is channel), default=math.inf)


def grouped_acks(due: list[int], lowest_unsettled: float) -> tuple[int | None, list[int]]:
    """The acknowledgements that settle the sorted tags `due`: the highest tag below
    `lowest_unsettled` with `multiple` (None if there is none), and the tags above it
    one by one, since `multiple` there would settle a delivery still in hand."""
    below = [tag for tag in due if tag < lowest_unsettled]
    return (below[-1] if below else None), due[len(below):]
