"""The broker requests behind a worker's shared-limit slots (see mq_worker.slots): taking
slot tokens and counting the runs waiting for a target, on channels of the gate's own
on the session's connection, so that the lookups before a start, the wakes after an
end and the token requests do not queue behind each other (a channel has one request
in flight at a time)."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import aiormq.abc
import aiormq.exceptions
import anyio
import anyio.lowlevel
import structlog
from pamqp import commands as spec
from pydantic import ValidationError

from mq_worker import topology
from mq_worker.control import TokenMessage
from mq_worker.limits import ControlState
from mq_worker.spares import HeldToken
from mq_worker.token_channels import settle_on, transaction

log = structlog.get_logger("mq_worker.slots")

UNKNOWN = -1  # a waiting count the broker could not give
_CHANNEL_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)
# A token of this worker's that `take_back` does not find may be held for a moment by
# another worker taking its own back likewise (a node loss cuts several off at once):
# it looks this many times in all, a jittered pause apart, and on until its deadline,
# before it gives up on it.
TAKE_BACK_PASSES = 3
TAKE_BACK_PAUSE_SECONDS = (0.05, 0.15)
SWEEP_IDLE_SECONDS = 0.05  # see `SlotRequests._sweep`
Mine = tuple[str, int, int]  # a token as its holder knows it: (target, number, version)


def key_of(token: HeldToken) -> Mine:
    return token.target, token.number, token.version


@dataclass(eq=False)
class Lease:
    """The tokens a run holds, on the channel that holds them."""

    channel: aiormq.abc.AbstractChannel | None
    tokens: list[HeldToken] = field(default_factory=list)
    run_id: str = ""


class SlotRequests:
    """Token and waiting-count requests of one worker's slot gate."""

    def __init__(self, state: ControlState) -> None:
        self.state = state
        self._own: dict[str, aiormq.abc.AbstractChannel] = {}
        self._opening = anyio.Lock()
        # Set when a channel holding tokens closes; one per session (see `new_session`).
        self.token_channel_lost = anyio.Event()

    def new_session(self) -> None:
        self.token_channel_lost = anyio.Event()

    async def take(self, target: str, lease: Lease,
                   channel: aiormq.abc.AbstractChannel | None = None) -> bool:
        """Take a token of `target` for `lease`, on `channel` (default: the lease's);
        False if none is free. Tokens no longer valid are destroyed on the way.

        A token the broker marks redelivered came back with a lost connection, whose
        worker may be back in a moment to take it back (it takes back only its own:
        `take_back`), and RabbitMQ hands such a token first. So one behind it is taken
        instead if the next token is a free one; the marked one is put back, still
        marked, and taken only if no free one follows."""
        queue = topology.limit_queue_name(target)
        channel = channel or lease.channel
        assert channel is not None
        held_on = None if channel is lease.channel else channel
        marked: HeldToken | None = None  # passed over once, in `lease` meanwhile
        while True:
            message = await channel.basic_get(queue, no_ack=False)
            if not isinstance(message.delivery, spec.Basic.GetOk):
                return marked is not None
            tag = message.delivery.delivery_tag
            assert tag is not None
            limit = self.state.limits.get(target)
            if limit is None:  # removed since: nothing to hold
                with anyio.CancelScope(shield=True):
                    async with transaction(channel):
                        for unused in ([tag, marked.tag] if marked is not None else [tag]):
                            await channel.basic_nack(unused, requeue=True, wait=False)
                        if marked is not None:
                            lease.tokens.remove(marked)
                        await channel.tx_commit()
                return True
            try:
                token = TokenMessage.model_validate_json(message.body)
            except ValidationError:
                token = None
            if token is not None and self.still_valid(target, token.number, token.version):
                # Redelivered: it came back with a lost connection, or unused (see `settle`).
                held = HeldToken(target, tag, token.number, token.version, channel=held_on,
                                 returned=bool(message.delivery.redelivered))
                if marked is None and held.returned:
                    marked = held
                    lease.tokens.append(held)
                    continue
                if marked is not None:
                    back = held if held.returned else marked
                    with anyio.CancelScope(shield=True):
                        if back is marked:
                            lease.tokens.remove(marked)
                            lease.tokens.append(held)
                        async with transaction(channel):
                            await channel.basic_nack(back.tag, requeue=True, wait=False)
                            await channel.tx_commit()
                    return True
                lease.tokens.append(held)
                return True
            # Left over from an earlier, larger limit (or not a token at all): destroy it.
            log.info("stale slot token destroyed", target=target,
                     token=message.body[:200].decode(errors="replace"))
            async with transaction(channel):
                await channel.basic_ack(tag)
                await channel.tx_commit()

    async def take_each(self, targets: list[str], lease: Lease) -> str | None:
        """Take a token of each target, all at once (a channel each: a channel has one
        `basic.get` in flight at a time); the first that has none, if any.

        A `basic.get` never waits for a token, so taking them together cannot deadlock;
        a run that misses one gives back the others (see `admit`)."""
        if len(targets) <= 1:
            return targets[0] if targets and not await self.take(targets[0], lease) else None
        slots = lease.channel
        assert slots is not None
        channels = [slots, *[await self.channel(f"tokens-{index}", slots, holds_tokens=True)
                             for index in range(1, len(targets))]]
        taken: dict[str, bool] = {}

        async def take(target: str, channel: aiormq.abc.AbstractChannel) -> None:
            taken[target] = await self.take(target, lease, channel)

        async with anyio.create_task_group() as tg:
            for target, channel in zip(targets, channels, strict=True):
                tg.start_soon(take, target, channel)
        return next((target for target in targets if not taken[target]), None)

    async def count_waiting(self, slots: aiormq.abc.AbstractChannel, targets: list[str],
                            counts: dict[str, int], confirm_none: Collection[str]) -> None:
        """Count the runs waiting for each target, all at once (a channel each); a count
        of 0 is made sure of for the targets in `confirm_none` (see `waiting`)."""
        async def count(index: int, target: str) -> None:
            waiting = await self.waiting(await self.channel(f"lookups-{index}", slots), target,
                                         confirm_none=target in confirm_none)
            counts[target] = UNKNOWN if waiting is None else waiting

        if len(targets) == 1:
            return await count(0, targets[0])
        async with anyio.create_task_group() as tg:
            for index, target in enumerate(targets):
                tg.start_soon(count, index, target)

    @staticmethod
    async def waiting(channel: aiormq.abc.AbstractChannel, target: str, *,
                      confirm_none: bool = True) -> int | None:
        """Runs waiting for `target` (a passive declare: no Raft round, unlike a get);
        None if the broker does not find the queue (and closes the channel).

        RabbitMQ answers the declare of a quorum queue with 0 when it cannot ask the
        queue's leader within 250 ms (a node being lost, a leader just moved), so a 0 is
        no answer: unless `confirm_none` is False, it is checked with a `basic.get`, which
        goes through the leader (a Raft round, paid only when the declare says 0). A run
        found so is given back at once, and RabbitMQ puts it behind the others: the
        price, paid only on a 0 given for want of an answer, of not taking a slot
        ahead of it.
        """
        queue = topology.waiting_queue_name(target)
        try:
            declared = await channel.queue_declare(queue, passive=True)
            if declared.message_count or not confirm_none:
                return int(declared.message_count or 0)
            message = await channel.basic_get(queue, no_ack=False)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        if not isinstance(message.delivery, spec.Basic.GetOk):
            return 0
        tag = message.delivery.delivery_tag
        assert tag is not None
        await channel.basic_nack(tag, requeue=True, wait=False)
        return 1 + int(message.delivery.message_count or 0)

    async def channel(self, purpose: str, slots: aiormq.abc.AbstractChannel,
                      holds_tokens: bool = False) -> aiormq.abc.AbstractChannel:
        """This gate's own channel for `purpose` on the connection of `slots`.

        Tokens on a channel that `holds_tokens` go back to the broker if it closes
        alone: `token_channel_lost` is set, and the session ends (pool_control), so that
        the runs holding them take them again or are stopped, as after any lost
        connection."""
        async with self._opening:
            channel = self._own.get(purpose)
            if channel is None or channel.is_closed or channel.connection is not slots.connection:
                channel = self._own[purpose] = await slots.connection.channel(
                    publisher_confirms=False)
                if holds_tokens:
                    await channel.tx_select()  # see `settle`
                    lost = self.token_channel_lost
                    channel.closing.add_done_callback(lambda _: lost.set())
            return channel

    @staticmethod
    async def settle(default: aiormq.abc.AbstractChannel, give_back: list[HeldToken],
                     destroy: Collection[HeldToken] = ()) -> None:
        """Give back and destroy held tokens, on the transactional channels holding them
        (`default` for those held on their lease's channel).

        A token given back is acknowledged and published again as a new message in one
        transaction: the broker applies both or, if the connection breaks before the
        commit, neither (it then puts the token back as if lost with the connection). So
        a token the broker marks redelivered can only have come back with a lost
        connection, its holder's runs perhaps still running: the run that takes it holds
        it unused first (see slots.RETURNED_TOKEN_HOLD_MARGIN_SECONDS). A `returned` token
        given back unused is put back as it is, still marked, since its hold is not over.
        """
        held_on: dict[int, tuple[aiormq.abc.AbstractChannel, list[HeldToken]]] = {}
        for token in [*give_back, *destroy]:
            channel = token.channel or default
            held_on.setdefault(id(channel), (channel, []))[1].append(token)
        # Not cancelled half way: an acknowledgement left without its publish on a channel
        # that lives on would be committed by the next commit there, and the slot lost.
        # Nor interleaved with another transaction on the channel (see token_channels).
        with anyio.CancelScope(shield=True):
            for channel, tokens in held_on.values():
                await settle_on(channel, tokens, destroy)

    async def take_back(self, channel: aiormq.abc.AbstractChannel, leases: Collection[Lease],
                        until: float = 0.0, stand_ins: bool = False
                        ) -> tuple[dict[Mine, HeldToken], set[Mine]]:
        """After a reconnection: take again, on `channel`, the very tokens the `leases` held
        (same target, number and version), found by scanning each target's token queue;
        the tokens found (as the broker gave them: marked), and the free tokens of others
        taken and published again (see `scan`), each once. A token not found
        is looked for again, TAKE_BACK_PASSES times in all and then for as long as the
        next pass can start before `until` (time.monotonic(): the runs' deadline). With
        `stand_ins`, from the second pass on, a released token serves for one not found.

        Several workers cut off together scan at once, each holding what it takes until
        its pass ends: with a few tokens each, a worker's token was held by another's
        scan pass after pass, and half the runs were stopped though all were back in
        time (`benchmarks.take_back`).

        Not any other token: a marked one may be that of another worker cut off after
        this one, whose runs go on until its own deadline; only a token this worker held,
        or one no run holds (given back by a run that ended, never marked), is one no run
        elsewhere can use without having waited for this worker's runs to stop (see
        slots)."""
        wanted: dict[str, set[tuple[int, int]]] = {}
        for lease in leases:
            for token in lease.tokens:
                if token.target in self.state.limits:  # (removed: nothing to hold)
                    wanted.setdefault(token.target, set()).add((token.number, token.version))
        found: dict[Mine, HeldToken] = {}
        released: set[Mine] = set()
        for target, own in sorted(wanted.items()):
            for attempt in itertools.count():
                if attempt:
                    pause = random.uniform(*TAKE_BACK_PAUSE_SECONDS)
                    if attempt >= TAKE_BACK_PASSES and time.monotonic() + pause >= until:
                        break
                    await anyio.sleep(pause)
                taken, fresh = await self.scan(channel, target, own,
                                               stand_ins=stand_ins and attempt > 0)
                found.update(((target, *key), token) for key, token in taken.items())
                released.update((target, *key) for key in fresh)
                own = own - set(taken)
                if not own:
                    break
        return found, released - {key_of(token) for token in found.values()}

    async def scan(self, channel: aiormq.abc.AbstractChannel, target: str,
                   wanted: Collection[tuple[int, int]], *, stand_ins: bool = False
                   ) -> tuple[dict[tuple[int, int], HeldToken], set[tuple[int, int]]]:
        """Take tokens of `target` until those `wanted` ((number, version)) are found or
        the queue has no more; keep those, put the others back; the tokens kept, and those
        put back free ((number, version): published again; the release that freed one woke
        a run, which may have found it taken here, so the caller wakes one for each).
        With `stand_ins`, a wanted token not found is kept as a free token taken on the
        way, if there is one (never a marked one), under the wanted key.

        Every token taken is held until the scan ends, so none is seen twice (a quorum
        queue may hand a token put back straight back). The others are put back as
        `settle` gives back a token, in one transaction: a free one published again as a
        new message, one marked redelivered (lost with its holder's connection) put back
        as it is, still marked, so that its next taker still holds it before its run
        starts. Tokens no longer valid are destroyed, as `take` does."""
        queue = topology.limit_queue_name(target)
        kept: dict[tuple[int, int], HeldToken] = {}
        others: list[HeldToken] = []
        stale: list[HeldToken] = []

        def sort(message: aiormq.abc.DeliveredMessage) -> None:
            delivery = message.delivery
            assert isinstance(delivery, spec.Basic.GetOk | spec.Basic.Deliver)
            tag = delivery.delivery_tag
            assert tag is not None
            try:
                token = TokenMessage.model_validate_json(message.body)
            except ValidationError:
                stale.append(HeldToken(target, tag, -1, 0))
                return
            held = HeldToken(target, tag, token.number, token.version,
                             returned=bool(delivery.redelivered))
            key = (token.number, token.version)
            if not self.still_valid(target, *key):
                stale.append(held)
            elif key in wanted and key not in kept:
                kept[key] = held
            else:
                others.append(held)

        try:
            swept = False
            while len(kept) < len(wanted):
                message = await channel.basic_get(queue, no_ack=False)
                if not isinstance(message.delivery, spec.Basic.GetOk):
                    break
                sort(message)
                if not swept and len(kept) < len(wanted):  # (its own is often first)
                    swept = True
                    await self._sweep(channel, queue, int(message.delivery.message_count or 0),
                                      sort, lambda: len(kept) >= len(wanted))
            if stand_ins:
                free = [token for token in others if not token.returned]
                for key in [key for key in wanted if key not in kept][:len(free)]:
                    kept[key] = free.pop(0)
                    others.remove(kept[key])
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(*_CHANNEL_ERRORS):
                await self.settle(channel, [*others, *kept.values()], stale)
            raise
        if stale:
            log.info("stale slot tokens destroyed", target=target, count=len(stale))
        if others or stale:
            await self.settle(channel, others, stale)
        return kept, {(token.number, token.version) for token in others if not token.returned}

    @staticmethod
    async def _sweep(channel: aiormq.abc.AbstractChannel, queue: str, expected: int,
                     sort: Callable[[aiormq.abc.DeliveredMessage], None],
                     done: Callable[[], bool]) -> None:
        """The bulk of a scan: take the `expected` tokens the queue holds (as its first
        get said) with a consumer, as fast as the broker sends them (a `basic.get` is a
        round trip each: about 0.5 s for 1000 tokens on a loaded machine, see
        `benchmarks.take_back`), each held like a got one, until `done`, `expected`
        received, or none for SWEEP_IDLE_SECONDS. The scan goes on with gets until the
        queue is empty, so a sweep that ends early only leaves more to the gets."""
        if expected < 2:
            return
        send, receive = anyio.create_memory_object_stream[aiormq.abc.DeliveredMessage](
            math.inf)

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            send.send_nowait(message)

        consuming = await channel.basic_consume(queue, on_message, no_ack=False)
        received = 0
        try:
            while received < expected and not done():
                with anyio.move_on_after(SWEEP_IDLE_SECONDS):
                    sort(await receive.receive())
                    received += 1
                    continue
                break
        finally:
            with anyio.CancelScope(shield=True):
                assert consuming.consumer_tag is not None
                with contextlib.suppress(*_CHANNEL_ERRORS):
                    await channel.basic_cancel(consuming.consumer_tag)
                # Deliveries before the cancel's reply reached `on_message` before it.
                await anyio.lowlevel.checkpoint()
                while True:
                    try:
                        sort(receive.receive_nowait())
                    except anyio.WouldBlock:
                        break

    def still_valid(self, target: str, number: int, version: int) -> bool:
        limit = self.state.limits.get(target)
        if limit is None:
            return False
        return limit.valid(number, version) or version > limit.newest_version
