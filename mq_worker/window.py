"""The consumer's window: how many runs the broker may still push, against the free slots.

Pure bookkeeping, no I/O. `RunConsumer` tells the window what happened (a consumer
opened or cancelled, a delivery arrived, was held or acknowledged) and asks it what to
do next (acknowledge or wait, which consumers to cancel and open with what prefetch).

The invariant (see mq_worker.consumer for why):

    slots in use + messages the broker may still send us  <=  limit

"Messages the broker may still send" (`outstanding`) is, summed over the
active consumers, their prefetch minus their unacknowledged deliveries; plus,
for one we cancelled, what was in flight until cancel-ok. `room` is what the
limit leaves once both are counted: a new consumer may be opened with at most
that prefetch, and an acknowledgement that reopens a window without freeing a
slot needs `fits_one_more` (until then it is deferred, here).

The consumer's limiter counts the slots, read here; deliveries are opaque keys.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeAlias, TypeVar

from mq_worker.priority import allocate_windows


class SlotCount(Protocol):
    """What the window reads of a slot limiter (an `anyio.CapacityLimiter` is one)."""

    @property
    def total_tokens(self) -> float: ...

    @property
    def borrowed_tokens(self) -> int: ...


@dataclass(eq=False)
class ConsumerWindow:
    """One consumer of one queue: its prefetch and its unacknowledged deliveries."""

    queue: str
    tag: str
    prefetch: int
    unacked: int = 0
    held: int = 0  # of `unacked`, those whose run waits for its start time
    active: bool = True
    cancelling: bool = False  # cancelled by us, cancel-ok not yet received
    in_flight: int = 0  # while cancelling: what the broker may still push

    @property
    def open(self) -> int:
        """Deliveries the broker may still push on this consumer."""
        return self.prefetch - self.unacked if self.active else self.in_flight

    @property
    def closed(self) -> bool:
        """It pushes nothing more, whatever is settled: cancelled and confirmed, or gone."""
        return not (self.active or self.cancelling)


K = TypeVar("K")

@dataclass(frozen=True)
class Ack(Generic[K]):
    """Acknowledge this started run, whose acknowledgement was deferred: it fits now."""

    delivery: K


@dataclass(frozen=True)
class Cancel:
    """Cancel this consumer: `Window.cancelling`, basic.cancel, then `Window.retire`.
    `overdue`: an acknowledgement on it waited out its deadline for room."""

    consumer: ConsumerWindow
    overdue: bool = False


@dataclass(frozen=True)
class Consume:
    """Open a consumer on `queue` with this prefetch."""

    queue: str
    prefetch: int


Step: TypeAlias = "Ack[K] | Cancel | Consume"


@dataclass(frozen=True)
class WindowStatistics:
    limit: int
    slots_in_use: int
    outstanding: int
    active_consumers: int
    waiting_acks: int  # of started runs, deferred until they fit
    max_window: int = 0  # the widest a window opened now may be

    @property
    def room(self) -> int:
        return self.limit - self.slots_in_use - self.outstanding


class Window(Generic[K]):
    """The consumers of one channel and what they let the broker push, against `slots`."""

    def __init__(self, slots: SlotCount, max_window: int, *, ack_group: int = 1,
                 group_wait: float = 0.0) -> None:
        self._slots = slots
        self.max_window = max(1, max_window)
        self._consumers: dict[str, ConsumerWindow] = {}
        # delivery: (consumer tag, deadline, whether it was held for its start time)
        self._deferred: dict[K, tuple[str, float, bool]] = {}
        # Deferred acknowledgements that fit go `ack_group` at a time (one frame, one
        # settlement on the queue), each waiting at most `group_wait` seconds for the rest.
        self._ack_group = max(1, ack_group)
        self._grouping = True  # only while one queue is served (see reconcile)
        self._group_wait = group_wait
        self._fits_since: float | None = None

    # -- figures -------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return int(self._slots.total_tokens)

    def free_slots(self) -> int:
        return self.limit - self._slots.borrowed_tokens

    def outstanding(self) -> int:
        return sum(c.open for c in self._consumers.values())

    def room(self) -> int:
        return self.free_slots() - self.outstanding()

    def fits_one_more(self) -> bool:
        return self.room() >= 1

    def statistics(self) -> WindowStatistics:
        return WindowStatistics(
            limit=self.limit,
            slots_in_use=self._slots.borrowed_tokens,
            outstanding=self.outstanding(),
            active_consumers=self.active_consumers(),
            waiting_acks=len(self._deferred),
            max_window=self.max_window,
        )

    def active_consumers(self) -> int:
        return sum(1 for c in self._consumers.values() if c.active)

    def consumers(self) -> list[ConsumerWindow]:
        return list(self._consumers.values())

    def consumer(self, tag: str) -> ConsumerWindow | None:
        return self._consumers.get(tag)

    def active_on(self, queue: str) -> ConsumerWindow | None:
        for consumer in self._consumers.values():
            if consumer.queue == queue and consumer.active:
                return consumer
        return None

    # -- what happened -------------------------------------------------------------

    def opened(self, queue: str, tag: str, prefetch: int) -> ConsumerWindow:
        """A consumer is about to be registered: count its window from now on."""
        consumer = ConsumerWindow(queue=queue, tag=tag, prefetch=prefetch)
        self._consumers[tag] = consumer
        return consumer

    def cancelling(self, consumer: ConsumerWindow) -> None:
        """Our basic.cancel is on its way (aiormq writes it a loop turn later): what the
        broker pushed before it arrives until cancel-ok."""
        consumer.in_flight = consumer.open
        consumer.active, consumer.cancelling = False, True

    def retire(self, consumer: ConsumerWindow) -> None:
        """Cancel-ok arrived, or the broker cancelled the consumer: it pushes nothing more."""
        consumer.active = consumer.cancelling = False
        consumer.in_flight = 0
        self.forget_if_drained(consumer)

    def forget_if_drained(self, consumer: ConsumerWindow) -> None:  # nothing more to count
        if consumer.closed and consumer.unacked == 0:
            self._consumers.pop(consumer.tag, None)

    def delivered(self, consumer: ConsumerWindow) -> None:
        """The broker pushed one message on `consumer` (it has taken a slot)."""
        consumer.unacked += 1
        if consumer.cancelling:
            consumer.in_flight = max(0, consumer.in_flight - 1)

    def held(self, tag: str) -> None:
        """A delivery of `tag` will stay unacknowledged until its run's start time."""
        consumer = self._consumers.get(tag)
        if consumer is not None:
            consumer.held += 1

    def acknowledged(self, tag: str, *, was_held: bool) -> None:
        """A delivery of `tag` was acknowledged, rejected or given back."""
        consumer = self._consumers.get(tag)
        if consumer is None:
            return
        consumer.unacked -= 1
        if was_held:
            consumer.held -= 1
        if consumer.cancelling:  # written before the cancel, it lets the broker push one more
            consumer.in_flight += 1
        self.forget_if_drained(consumer)

    def may_ack_started(self, tag: str) -> bool:
        """Whether a started run delivered on `tag` can be acknowledged now: acknowledging
        reopens its consumer's window without freeing a slot (nothing on a closed one)."""
        consumer = self._consumers.get(tag)
        return consumer is None or consumer.closed or self.fits_one_more()

    @property
    def gathering(self) -> bool:  # acknowledgements that fit wait for others to go with them
        return self._fits_since is not None

    def may_ack_new(self, tag: str, *, held: bool = False) -> bool:
        """Whether a run just started on `tag` can be acknowledged now: it fits, no
        acknowledgement waits before it and no run delivered with it is being started (in
        order and together, a group settles with one frame)."""
        if self._grouping and self._ack_group > 1 and (
                self._deferred or self._in_handling() > (0 if held else 1)):  # held: uncounted
            consumer = self._consumers.get(tag)
            return consumer is None or consumer.closed
        return self.may_ack_started(tag)

    def _in_handling(self) -> int:
        """Deliveries being handled (a run starting): not held, not waiting for their ack."""
        in_hand = sum(c.unacked - c.held for c in self._consumers.values())
        return max(0, in_hand - sum(1 for *_, held in self._deferred.values() if not held))

    def defer_ack(self, delivery: K, tag: str, deadline: float, *, held: bool = False) -> None:
        """Acknowledge `delivery` (of consumer `tag`; `held`: held for its start time) once
        it fits; after `deadline` cancel its consumer instead, which lets it go at once."""
        self._deferred[delivery] = (tag, deadline, held)

    def drop_deferred(self, delivery: K) -> None:
        """`delivery` was settled otherwise (or its channel is gone)."""
        self._deferred.pop(delivery, None)

    def resize(self, max_window: int, ack_group: int) -> None:
        """Windows from now on: at most `max_window`; acknowledgements `ack_group` at a time."""
        self.max_window, self._ack_group = max(1, max_window), max(1, ack_group)

    def next_deadline(self) -> float | None:
        deadlines = [deadline for _, deadline, _ in self._deferred.values()]
        if self._fits_since is not None:
            deadlines.append(self._fits_since + self._group_wait)
        return min(deadlines, default=None)

    def clear(self) -> None:
        self._consumers.clear()
        self._deferred.clear()
        self._fits_since = None

    # -- what to do ----------------------------------------------------------------

    def reconcile(
        self,
        *,
        now: float,
        stopped: bool,
        serving: Sequence[str],
        paused_queues: Collection[str],
        ready: Sequence[int] | None,
        free: int,
    ) -> Iterator[Step[K]]:
        """Every step of one reconciliation of the windows with the free slots. A
        generator: each step is decided after the previous one was carried out,
        against the window as it is then. `stopped`: take no runs at all (the
        consumer is paused). `serving`: the queues to take runs from, first
        listed first; with several, `ready` holds their ready counts, read while
        `free` slots were free (None when there were none).
        """
        # Acknowledgements wait for others only while one queue is served. With several,
        # those that fit go before the windows are shared out by priority: a window planned
        # while they waited could take their room, or go to a lower queue (docs/pools.md).
        self._grouping = len(serving) <= 1
        yield from self._due_acks(now)
        overdue = {tag for tag, deadline, _ in self._deferred.values() if deadline <= now}
        for tag in overdue:
            if (consumer := self._consumers.get(tag)) is not None:
                yield Cancel(consumer, overdue=True)
        yield from self._due_acks(now)
        if stopped or not serving:
            for consumer in self.consumers():
                yield Cancel(consumer)
        else:
            for queue in list(paused_queues):
                if (consumer := self.active_on(queue)) is not None:
                    yield Cancel(consumer)
            yield from self._due_acks(now)
            if len(serving) > 1:
                if ready is not None and free > 0:
                    yield from self.plan_by_priority(serving, ready, free)
            else:
                yield from self.plan_single(serving[0])
        # A cancelled consumer reopens nothing: what waited on it goes now, not at its deadline.
        yield from self._due_acks(now)

    def _due_acks(self, now: float) -> Iterator[Ack[K]]:
        if not self._gathered(now):
            return
        for delivery in list(self._deferred):
            entry = self._deferred.get(delivery)
            if entry is not None and self.may_ack_started(entry[0]):
                del self._deferred[delivery]
                yield Ack(delivery)

    def _gathered(self, now: float) -> bool:
        """Whether the deferred acknowledgements that fit may go: a group fits, or all fit
        and no run is being started, or one is of a cancelled consumer (it reopens
        nothing) or overdue, or the first has waited `group_wait`."""
        if not self._grouping or self._ack_group == 1 or not self._deferred:
            self._fits_since = None
            return True
        room = self.room()
        fits = min(room, len(self._deferred))
        if fits >= self._ack_group or (
                fits == len(self._deferred) and self._in_handling() == 0) or any(
                self._consumers.get(tag) is None or self._consumers[tag].closed
                or deadline <= now for tag, deadline, _ in self._deferred.values()):
            self._fits_since = None
            return True
        if room <= 0:
            self._fits_since = None
            return False
        if self._fits_since is None:
            self._fits_since = now
        if now - self._fits_since < self._group_wait:
            return False
        self._fits_since = None
        return True

    def plan_single(self, queue: str) -> Iterator[Cancel | Consume]:
        """Steps that give `queue`, served alone, a window of up to `max_window`."""
        current = self.active_on(queue)
        share = self.max_window
        if current is not None and current.prefetch > share:
            yield Cancel(current)  # the window was narrowed (mq_worker.window_width)
            current = None
        room = self.room()
        if room <= 0:
            return
        if current is not None:
            if current.open == 0 and current.held:
                # Its window is closed by runs waiting for their start time: retire it
                # (they stay unacknowledged on the channel) and open a new one.
                yield Cancel(current)
            elif min(share, room + current.open) <= current.prefetch:
                return  # its runs in hand keep their slots: a successor would be no wider
            else:
                yield Cancel(current)  # grow a window shrunk by a capacity crunch
            room = self.room()
            if room <= 0:
                return
        yield Consume(queue, min(share, room))

    def plan_by_priority(
        self, queues: Sequence[str], ready: Sequence[int], free: int
    ) -> Iterator[Cancel | Consume]:
        """Steps that share `free` slots out over `queues` (first listed first, see priority)
        given the runs `ready` in each."""
        targets = allocate_windows(free, ready, self.max_window)
        for queue, target in zip(queues, targets, strict=True):
            current = self.active_on(queue)
            if current is not None and (
                target == 0 or current.open > target or (current.open == 0 and current.held)
            ):
                yield Cancel(current)
        for queue, target in zip(queues, targets, strict=True):
            if target == 0:
                continue
            current = self.active_on(queue)
            if current is not None:
                if current.open >= target:
                    continue
                yield Cancel(current)  # grow it: more runs wait than its window
            room = self.room()
            if room <= 0:
                return
            yield Consume(queue, min(target, room))

    def should_probe(self, serving: Sequence[str]) -> bool:
        """A queue nobody listens to while a window waits idle: look for runs there."""
        return (
            len(serving) > 1
            and self.outstanding() > 0
            and any(self.active_on(q) is None for q in serving)
        )

