"""Shared limits on a worker: slot tokens taken before a run starts, returned when it ends.

A limit of N on a target is N token messages in the quorum queue
`mq_worker.limit-<digest>`. A worker that takes a run counting against limited
targets takes one token of each (basic.get, in one global order so that two
workers never wait on each other), and keeps them *unacknowledged* on its
session's slots channel while the run holds its worker slot. When the run ends
it gives them back (basic.nack with requeue, one atomic step). If the worker
dies or its connection closes, the broker puts its tokens back by itself, so a
slot never leaks; and since a token is a single message that the broker hands
to one consumer at a time, a slot is never usable twice.

A run that finds no token does not wait on the worker: it is moved (confirmed
publish, then acknowledgement) to `mq_worker.waiting-<digest>`, a FIFO queue of
the runs waiting for that target, which frees its worker slot and lets the
worker take other runs of the same queue. Whoever gives a token back, and a
worker that has just queued a run there, then moves as many of the oldest
waiting runs back to their work queues as there are free tokens ("wakes"
them): each check follows the other's step, so no wakeup is lost; a periodic
check (pool_control) also wakes runs for slots that came back when a holder died.

Order of arrival: a fresh run joins the waiting queue instead of taking a free
token when runs of its target wait (a woken run skips that check for the
target it was woken for). A fresh run arriving while a woken run is on its way
back to its work queue can still take the slot first; the woken run then waits
again, at the back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiormq.abc
import aiormq.exceptions
import anyio
import structlog
from pamqp import commands as spec
from pydantic import ValidationError

from mq_worker import topology
from mq_worker.consumer import Delivery
from mq_worker.control import TokenMessage
from mq_worker.limits import ControlState
from mq_worker.pool_admin import queue_depths, wake_waiting
from mq_worker.topology import QUEUE_HEADER, WOKEN_HEADER

log = structlog.get_logger("mq_worker.slots")

_CHANNEL_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)


class HeldToken(NamedTuple):
    target: str
    tag: int
    number: int
    version: int


@dataclass(eq=False)
class Lease:
    """The tokens a run holds, on the channel that holds them."""

    channel: aiormq.abc.AbstractChannel | None
    tokens: list[HeldToken] = field(default_factory=list)


@dataclass(frozen=True)
class Waiting:
    """The run waits for a slot of `target`; its message is in the target's waiting queue."""

    target: str


class SlotGate:
    """Takes and gives back the slot tokens of one worker's runs."""

    def __init__(self, state: ControlState) -> None:
        self.state = state
        self._slots: aiormq.abc.AbstractChannel | None = None
        self._publish: aiormq.abc.AbstractChannel | None = None
        self._leases: set[Lease] = set()

    def bind(self, slots: aiormq.abc.AbstractChannel | None,
             publish: aiormq.abc.AbstractChannel | None) -> None:
        """Use these channels of the current session (None: no session)."""
        self._slots, self._publish = slots, publish

    async def admit(self, targets: list[str], delivery: Delivery) -> Lease | Waiting | None:
        """Take a token of each limited target, or move the run to a waiting queue.

        None: the delivery's channel is gone (the broker delivers it again).
        """
        slots, publish = self._slots, self._publish
        if slots is None or publish is None or slots.is_closed:
            return None
        woken_for = _text(delivery.headers.get(WOKEN_HEADER))
        lease = Lease(slots)
        try:
            for target in targets:
                check = target != woken_for
                if not await self._take_unless_waiting(target, lease, publish, check):
                    return await self._wait(target, delivery, lease, publish)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.release(lease)
            raise
        if lease.tokens:
            self._leases.add(lease)
        return lease

    async def reclaim(self) -> None:
        """After a reconnection: take again the slots of runs still running here.

        The broker gave their tokens back when the old connection closed; until they
        are taken again (first, before new runs) another worker may use them.
        """
        channel = self._slots
        if channel is None:
            return
        for lease in list(self._leases):
            if lease.channel is channel:
                continue
            targets = [token.target for token in lease.tokens]
            lease.channel, lease.tokens = channel, []
            for target in targets:
                if not await self._take(target, lease):
                    log.warning("a running run's slot was taken while disconnected; it runs "
                                "over the limit until it ends", target=target)

    async def release(self, lease: Lease) -> None:
        """Give back a run's tokens, then wake runs waiting for them."""
        self._leases.discard(lease)
        tokens, lease.tokens = lease.tokens, []
        if not tokens or lease.channel is None or lease.channel.is_closed:
            return  # gone with the channel: the broker has put them back
        with contextlib.suppress(*_CHANNEL_ERRORS):
            for token in tokens:
                if self._still_valid(token.target, token.number, token.version):
                    await lease.channel.basic_nack(token.tag, requeue=True, wait=False)
                else:  # the limit shrank or went away while the run held it
                    await lease.channel.basic_ack(token.tag)
        for target in dict.fromkeys(token.target for token in tokens):
            await self.wake(target)

    def _still_valid(self, target: str, number: int, version: int) -> bool:
        limit = self.state.limits.get(target)
        if limit is None:
            return False
        return limit.valid(number, version) or version > limit.newest_version

    async def wake(self, target: str) -> None:
        """Move as many runs waiting for `target` back to their work queues as there are
        free tokens."""
        slots, publish = self._slots, self._publish
        if slots is None or publish is None or slots.is_closed:
            return
        try:
            free, waiting = await queue_depths(slots, target)
            if free and waiting:
                moved = await wake_waiting(slots, target, min(free, waiting), publisher=publish)
                log.debug("woke waiting runs", target=target, count=moved)
        except _CHANNEL_ERRORS as exc:
            log.warning("could not wake runs waiting for a slot", target=target, error=str(exc))

    async def wake_all(self, target: str) -> None:
        """The limit is gone: send every run waiting for it back to its work queue."""
        slots, publish = self._slots, self._publish
        if slots is None or publish is None or slots.is_closed:
            return
        try:
            await wake_waiting(slots, target, None, publisher=publish)
        except _CHANNEL_ERRORS as exc:
            log.warning("could not send back runs waiting for a removed limit",
                        target=target, error=str(exc))

    async def _take_unless_waiting(self, target: str, lease: Lease,
                                   other: aiormq.abc.AbstractChannel, check: bool) -> bool:
        """Take a token of `target` unless (with `check`) runs of it wait already.

        The waiting count is read on `other` while the token is asked for, so that
        both cost one round trip before the run starts, not two.
        """
        waiting = 0

        async def count() -> None:
            nonlocal waiting
            _, waiting = await queue_depths(other, target)

        async with anyio.create_task_group() as tg:
            if check:
                tg.start_soon(count)
            taken = await self._take(target, lease)
        if not waiting:
            return taken
        if taken and lease.tokens and lease.tokens[-1].target == target:
            held = lease.tokens.pop()
            assert lease.channel is not None
            await lease.channel.basic_nack(held.tag, requeue=True, wait=False)
        return False

    async def _take(self, target: str, lease: Lease) -> bool:
        queue = topology.limit_queue_name(target)
        channel = lease.channel
        assert channel is not None
        while True:
            message = await channel.basic_get(queue, no_ack=False)
            if not isinstance(message.delivery, spec.Basic.GetOk):
                return False
            tag = message.delivery.delivery_tag
            assert tag is not None
            limit = self.state.limits.get(target)
            if limit is None:  # removed since: nothing to hold
                await channel.basic_nack(tag, requeue=True, wait=False)
                return True
            try:
                token = TokenMessage.model_validate_json(message.body)
            except ValidationError:
                token = None
            if token is not None and self._still_valid(target, token.number, token.version):
                lease.tokens.append(HeldToken(target, tag, token.number, token.version))
                return True
            # Left over from an earlier, larger limit (or not a token at all): destroy it.
            log.info("stale slot token destroyed", target=target,
                     token=message.body[:200].decode(errors="replace"))
            await channel.basic_ack(tag)

    async def _wait(self, target: str, delivery: Delivery, lease: Lease,
                    publish: aiormq.abc.AbstractChannel) -> Waiting | None:
        await self.release(lease)
        if delivery.lost.is_set():
            return None  # a copy in the waiting queue would run it twice
        properties = delivery.properties
        headers: dict[str, Any] = {
            k: v for k, v in delivery.headers.items() if k != WOKEN_HEADER
        }
        headers[QUEUE_HEADER] = delivery.queue
        properties.headers = headers
        await publish.basic_publish(
            delivery.body, exchange="", routing_key=topology.waiting_queue_name(target),
            properties=properties, mandatory=True,
        )
        await delivery.settle()
        await self.wake(target)
        return Waiting(target)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None

