"""Shared limits on a worker: slot tokens taken before a run starts, returned when it ends.

A limit of N on a target is N token messages in the quorum queue
`mq_worker.limit-<digest>`. A worker that takes a run counting against limited targets
takes one token of each (basic.get, all at once: a get never waits for a token, so no
two workers can wait on each other), and keeps them *unacknowledged* on its session's
slots channel (a second target's on a channel of its own next to it: see slot_requests)
while the run holds its worker slot. When the run ends it gives them back (acknowledged
and published again in one transaction: see SlotRequests.settle). If the worker dies or
its connection closes, the broker puts its tokens back by itself, so a slot never leaks;
and since a token is a single message that the broker hands to one consumer at a time, a
slot is never usable twice. A token the broker puts back so comes marked redelivered,
which a token given back never is: the run that takes it holds it unused first, for as
long as its cut-off holder may take to stop the runs it held it for.

A run that finds no token does not wait on the worker: it is moved (confirmed publish,
then acknowledgement) to `mq_worker.waiting-<digest>`, a FIFO queue of the runs waiting
for that target, which frees its worker slot and lets the worker take other runs of the
same queue. A run that ends moves as many of the oldest waiting runs back to their work
queues ("wakes" them) as it gave tokens back; a run that found no token and no run
waiting before it wakes one if a token came free meanwhile: each check follows the
other's step, so no wakeup is lost. Tokens that came back without a release (their
holder died or was cut off) are handed on only by a periodic check (pool_control), after
a grace that lets a holder that was only cut off take them back first (`reclaim`).

Order of arrival: a fresh run joins the waiting queue instead of taking a free token
when runs of its target wait (docs/pools.md says where this order can give way).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiormq.abc
import aiormq.exceptions
import anyio
import structlog

from mq_worker import topology
from mq_worker.consumer import Delivery
from mq_worker.limits import ControlState
from mq_worker.pool_admin import queue_depths, wake_waiting
from mq_worker.slot_requests import UNKNOWN, Lease, Mine, SlotRequests, key_of
from mq_worker.spares import HeldToken, Spares
from mq_worker.topology import QUEUE_HEADER, WOKEN_HEADER
from mq_worker.wire_decoding import header_text

log = structlog.get_logger("mq_worker.slots")

# How long a fresh run after a reconnection waits for the runs here to take theirs back.
RECLAIM_WAIT_SECONDS = 10.0
# A run whose slots went back to the broker with a lost connection, and were not taken
# again within this long, is stopped: a run elsewhere that takes such a slot holds it
# unused for this long plus RETURNED_TOKEN_HOLD_MARGIN_SECONDS first, and the run must
# be gone by then, its stop's own grace (lifecycle.SLOT_LOST_GRACE_SECONDS) included.
CUT_OFF_SECONDS = 1.0
# After a reconnection, this long, fresh runs here take no free slot even with no run
# waiting: whatever cut this worker off (a node lost) may have cut off others, whose
# slots are free at the broker until they take them back (as long as the others leave
# returned slots alone: pool_control.RETURNED_SLOT_GRACE_SECONDS).
BACK_FROM_A_LOST_CONNECTION_SECONDS = 2.0
# A run that takes a token its holder lost with its connection (the broker marks it
# redelivered) holds it unused for CUT_OFF_SECONDS plus this before it starts: that
# holder's runs may still be running, and are gone within CUT_OFF_SECONDS of its
# noticing the loss, plus their stop's grace (lifecycle.SLOT_LOST_GRACE_SECONDS).
RETURNED_TOKEN_HOLD_MARGIN_SECONDS = 1.0
_CHANNEL_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)
_LOOKUP_ATTEMPTS = 60  # half a second apart, for a waiting queue not found (a node lost)


@dataclass(frozen=True)
class Waiting:
    """The run waits for a slot of `target`; its message is in the target's waiting queue."""

    target: str


class SlotGate:
    """Takes and gives back the slot tokens of one worker's runs."""

    def __init__(self, state: ControlState,
                 on_slot_lost: Callable[[str, str], None] | None = None) -> None:
        self.state = state
        self._on_slot_lost = on_slot_lost
        self._slots: aiormq.abc.AbstractChannel | None = None
        self._publish: aiormq.abc.AbstractChannel | None = None
        self._leases: set[Lease] = set()
        self._reclaimed = anyio.Event()
        self._cut_off = anyio.Event()  # set when a session ends
        self._sessions = 0
        self._fresh_runs_wait_until = 0.0  # monotonic: see BACK_FROM_A_LOST_CONNECTION_SECONDS
        self._lost_at = 0.0  # monotonic: when the last session ended
        self._requests = SlotRequests(state)
        self.spares = Spares(self._requests.still_valid,  # held on the slots channel
                             self._requests.settle)

    def bind(self, slots: aiormq.abc.AbstractChannel | None,
             publish: aiormq.abc.AbstractChannel | None) -> None:
        """Use these channels of the current session (None: no session)."""
        if slots is not self._slots:
            self.spares.forget()
            self._requests.new_session()
        if slots is not None and slots is not self._slots:
            if self._sessions:
                self._fresh_runs_wait_until = (time.monotonic()
                                               + BACK_FROM_A_LOST_CONNECTION_SECONDS)
            self._sessions += 1
        self._slots, self._publish = slots, publish
        if slots is None:
            self._reclaimed.set()  # runs waiting for the reclaim give up with the session
            self._reclaimed = anyio.Event()
            self._lost_at = time.monotonic()
            self._cut_off.set()

    async def end_session_if_tokens_lost(self) -> None:
        """For one session: a channel holding a second target's tokens closed alone
        (the broker took them back); end the session, as if the connection was lost."""
        await self._requests.token_channel_lost.wait()
        raise ConnectionError("a channel holding slot tokens closed")

    async def stop_runs_cut_off(self) -> None:
        """For the worker's life: after each lost session, stop the runs whose slots have
        not been taken again within CUT_OFF_SECONDS (reported to `on_slot_lost`).

        Their tokens went back to the broker with the connection: a run elsewhere that
        takes one holds it unused for CUT_OFF_SECONDS and a margin, these runs gone by then.
        """
        while True:
            await self._cut_off.wait()
            self._cut_off = anyio.Event()
            await anyio.sleep(CUT_OFF_SECONDS)
            for lease in list(self._leases):
                current = self._slots
                if lease.channel is current and current is not None and not current.is_closed:
                    continue  # taken again
                self._leases.discard(lease)  # no reclaim for it: it is being stopped
                target = lease.tokens[0].target if lease.tokens else "?"
                log.warning("cut off from the broker for longer than the slots of its runs "
                            "are kept for it; stopping the run", target=target,
                            run_id=lease.run_id)
                if self._on_slot_lost is not None:
                    self._on_slot_lost(lease.run_id, target)

    async def admit(self, targets: list[str], delivery: Delivery,
                    run_id: str = "") -> Lease | Waiting | None:
        """Take a token of each limited target, or move the run to a waiting queue.

        None: the delivery's channel is gone (the broker delivers it again).
        """
        slots, publish = self._slots, self._publish
        if slots is None or publish is None or slots.is_closed:
            return None
        if not self._reclaimed.is_set():
            # The runs still running here take their slots again first.
            with anyio.move_on_after(RECLAIM_WAIT_SECONDS):
                await self._reclaimed.wait()
            if self._slots is not slots or slots.is_closed:
                return None
        woken_for = header_text(delivery.headers.get(WOKEN_HEADER))
        lease = Lease(slots, run_id=run_id)
        # A woken run skips the waiting check for the target it was woken for.
        checked = [target for target in targets if target != woken_for]
        waiting: dict[str, int] = {}
        try:
            for _ in range(_LOOKUP_ATTEMPTS):
                missing = await self._take_and_count(slots, targets, checked, lease, waiting)
                if UNKNOWN not in waiting.values():
                    break
                # `limit set` declares the waiting queue with the token queue: missing,
                # it is on a node being lost. Taking a token now could overtake waiting
                # runs, or take the slot of a run whose worker is reconnecting.
                await self._give_back(lease)
                if self._slots is not slots:
                    return None
                await anyio.sleep(0.5)
            else:
                raise ConnectionError(f"cannot count the runs waiting for {targets}")
            if time.monotonic() < self._fresh_runs_wait_until:
                # Just back from a lost connection: a free slot may be that of a worker
                # cut off with this one and not yet back. Wait as if runs waited (the
                # periodic checks hand on what stays free; a release wakes as ever).
                for target in checked:
                    waiting[target] = max(waiting.get(target, 0), 1)
            blocked = next((t for t in targets if waiting.get(t) or t == missing), None)
            if blocked is not None:
                # Only a run that found no token and no run waiting before it wakes one
                # (see _wait); a token taken here and given back is not woken for: the
                # release that freed it woke a run already, or it came back without a
                # release (see pool_control).
                first = blocked == missing and blocked in checked and not waiting[blocked]
                # A spare, unlike a token just taken, was kept without waking anyone.
                spares = Counter(token.target for token in lease.tokens if token.spare)
                waits = await self._wait(blocked, delivery, lease, publish, wake=first)
                for target, count in spares.items():
                    await self.wake(target, at_most=count)
                return waits
            if (any(token.returned for token in lease.tokens)
                    and not await self._hold_returned(lease, slots)):
                return None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._give_back(lease)
            raise
        if lease.tokens:
            self._leases.add(lease)
        return lease

    async def _hold_returned(self, lease: Lease, slots: aiormq.abc.AbstractChannel) -> bool:
        """Hold the lease's tokens unused until their last holder's runs are gone (see
        RETURNED_TOKEN_HOLD_MARGIN_SECONDS); False if they went back to the broker
        meanwhile (with the session: the broker delivers the run again)."""
        seconds = CUT_OFF_SECONDS + RETURNED_TOKEN_HOLD_MARGIN_SECONDS
        log.info("a slot came back with a lost connection; holding it before the run starts",
                 targets=sorted({t.target for t in lease.tokens if t.returned}),
                 run_id=lease.run_id, seconds=seconds)
        await anyio.sleep(seconds)
        channels = {token.channel or slots for token in lease.tokens}
        if self._slots is not slots or any(channel.is_closed for channel in channels):
            lease.tokens = []
            return False
        lease.tokens = [token._replace(returned=False) for token in lease.tokens]
        return True

    async def _take_and_count(self, slots: aiormq.abc.AbstractChannel, targets: list[str],
                              checked: list[str], lease: Lease,
                              waiting: dict[str, int]) -> str | None:
        """Take a token of each target, and count the runs waiting for those `checked`;
        the first target without a free token, if any.

        The waiting counts are read while the tokens are asked for: both cost one
        round trip per target before the run starts, not two; with a spare of each
        target on this worker, the counts are the only round trip. A count of 0 is made
        sure of only for a target whose token comes from the broker: a spare is this
        worker's own, never a token a cut-off worker is about to take back.
        """
        needed = targets
        if lease.channel is self._slots:
            needed = await self.spares.take_for(targets, lease.tokens, slots)
        if not needed or not checked:
            if checked:
                await self._requests.count_waiting(slots, checked, waiting, needed)
            return await self._requests.take_each(needed, lease)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._requests.count_waiting, slots, checked, waiting, needed)
            missing = await self._requests.take_each(needed, lease)
        return missing

    async def depths(self, target: str) -> tuple[int, int] | None:
        """(free tokens, runs waiting) of `target`; None without a session."""
        slots = self._slots
        if slots is None or slots.is_closed:
            return None
        return await queue_depths(await self._requests.channel("checks", slots), target)

    async def reclaim(self) -> None:
        """After a reconnection, before any new run here takes a token: take again those the
        runs still running here held (SlotRequests.take_back; a released one may stand in),
        until their deadline; report the runs left without to `on_slot_lost` (stopped)."""
        channel = self._slots
        if channel is None:
            return
        try:
            leases = [lease for lease in list(self._leases) if lease.channel is not channel]
            found, released = await self._requests.take_back(channel, leases)
            for final in (False, True):
                missing = [lease for lease in leases
                           if not self._take_again(lease, found, channel, final)]
                if not missing or final:
                    break
                more, more_released = await self._requests.take_back(channel, [
                    Lease(None, [t for t in lease.tokens if key_of(t) not in found])
                    for lease in missing], until=self._lost_at + CUT_OFF_SECONDS, stand_ins=True)
                found.update(more)
                released |= more_released
                leases = missing
            if found:  # found for runs that ended or were stopped: back as they came
                await self._give_back(Lease(channel, list(found.values())))
            released |= {key_of(token) for token in found.values() if not token.returned}
            released -= {key_of(token) for lease in self._leases for token in lease.tokens}
            for target, count in Counter(key[0] for key in released).items():
                await self._wake_for_released(target, count)  # (see SlotRequests.scan)
        finally:
            if self._slots is channel:
                self._reclaimed.set()

    def _take_again(self, lease: Lease, found: dict[Mine, HeldToken],
                    channel: aiormq.abc.AbstractChannel, final: bool) -> bool:
        """Give `lease` its tokens `found`; False if one is missing and not `final`."""
        mine = [key_of(t) for t in lease.tokens]
        lost = next((key[0] for key in mine  # (a removed limit holds nothing)
                     if key not in found and key[0] in self.state.limits), None)
        if lost is not None and not final and lease in self._leases:
            return False
        if lease not in self._leases:  # ended, or stopped at its deadline, meanwhile:
            return True  # what was found for it goes back once all are done (`reclaim`)
        held = [found.pop(key) for key in mine if key in found]
        # Its own again: no run elsewhere can hold it, it needs no hold before use.
        lease.channel = channel
        lease.tokens = [token._replace(returned=False) for token in held]
        if lost is not None:
            log.warning("a running run's slot was taken while this worker was cut "
                        "off; stopping the run", target=lost, run_id=lease.run_id)
            if self._on_slot_lost is not None:
                self._on_slot_lost(lease.run_id, lost)
        return True

    async def _give_back(self, lease: Lease) -> None:
        assert lease.channel is not None
        tokens, lease.tokens = lease.tokens, []
        with contextlib.suppress(*_CHANNEL_ERRORS):
            await self._requests.settle(lease.channel, tokens)

    async def release(self, lease: Lease) -> None:
        """Give back a run's tokens, then wake runs waiting for them."""
        self._leases.discard(lease)
        tokens, lease.tokens = lease.tokens, []
        if not tokens or lease.channel is None or lease.channel.is_closed:
            return  # gone with the channel: the broker has put them back
        given_back: list[HeldToken] = []
        destroyed: list[HeldToken] = []
        for token in tokens:
            channel = token.channel or lease.channel
            if not self._requests.still_valid(token.target, token.number, token.version):
                # The limit shrank or went away: the slot is destroyed, not given
                # back, so it wakes nobody (a run woken for it would find no slot
                # and wait again, behind the runs that arrived after it).
                destroyed.append(token)
            elif not (channel is self._slots and self.spares.keep(token)):
                given_back.append(token)
        try:
            await self._requests.settle(lease.channel, given_back, destroyed)
        except _CHANNEL_ERRORS:
            return  # not committed: the broker puts them back with the channel
        # As many runs as this run gave slots back, whatever the broker counts free
        # (it may not count a token given back a moment ago yet): a token that came back
        # without a release (its holder was cut off) is not this run's to hand on.
        # (A spare is kept only while nobody waits: see mq_worker.spares.)
        for target, count in Counter(token.target for token in given_back).items():
            await self._wake_for_released(target, count)

    async def wake(self, target: str, at_most: int) -> None:
        """Move up to `at_most` runs waiting for `target` back to their work queues, no more
        than there are free tokens."""
        await self._wake(target, at_most, counted=True)

    async def _wake_for_released(self, target: str, count: int) -> None:
        # No count first: a passive declare can answer 0 for want of an answer (see
        # SlotRequests.waiting), which woke nobody until the periodic check handed the
        # slot on seconds later. A get goes through the queue's leader, and one that
        # finds a run moves it, so it keeps its place (unlike a get that only makes
        # sure, and gives back what it finds).
        await self._wake(target, count, counted=False)

    async def wake_all(self, target: str) -> None:
        """The limit is gone: send every run waiting for it back to its work queue."""
        await self._wake(target, None, counted=False)

    async def _wake(self, target: str, count: int | None, *, counted: bool) -> None:
        slots, publish = self._slots, self._publish
        if slots is None or publish is None or slots.is_closed:
            return
        try:
            channel = await self._requests.channel("wakes", slots)
            if counted:
                free, waiting = await queue_depths(channel, target)
                count = min(free, waiting, count or 0)
                if not count:
                    return
            moved = await wake_waiting(channel, target, count, publisher=publish)
            log.debug("woke waiting runs", target=target, count=moved)
        except _CHANNEL_ERRORS as exc:
            log.warning("could not wake runs waiting for a slot", target=target, error=str(exc))

    async def _wait(self, target: str, delivery: Delivery, lease: Lease,
                    publish: aiormq.abc.AbstractChannel, wake: bool) -> Waiting | None:
        await self._give_back(lease)
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
        if wake:
            # A slot given back while this run was on its way here woke nobody (or, with
            # runs waiting before it, one of them): wake this one.
            await self.wake(target, at_most=1)
        return Waiting(target)
