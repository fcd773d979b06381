"""The consumer's window, without a broker: its invariant under any interleaving.

A state machine plays the broker and the worker around one `Window`, the way
`RunConsumer` drives it: runs are published to several queues; the broker
pushes them on registered consumers within their prefetch; the worker holds
some (start time later), starts others (acknowledging at once or deferring the
acknowledgement), settles some without running them (reject, park, give back),
ends runs, lets deferred acknowledgements expire, pauses and resumes queues; the
broker cancels consumers on its own; time passes. Reconciliations
(`Window.reconcile`) are carried out one step at a time, with anything else
happening between two steps.

The model treats basic.consume as taking effect at once (`RunConsumer` counts a
consumer before it registers it). A basic.cancel goes out at once, but until
cancel-ok the broker may still push what it had in flight on that consumer, and
the reconciliation waits for cancel-ok before its next step.
Acknowledgements reach the broker later, grouped as `RunConsumer` writes them
(`grouped_acks`); gives-back reach it at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mq_worker.acks import grouped_acks
from mq_worker.consumer import ConsumerStatistics, Delivery, RunConsumer
from mq_worker.priority import allocate_windows
from mq_worker.settings import WorkerSettings
from mq_worker.window import (
    Ack,
    Cancel,
    Consume,
    ConsumerWindow,
    Step,
    Window,
    WindowStatistics,
)
from mq_worker.window_width import ack_group

QUEUES = ["high", "middle", "low"]
GROUP_WAIT = 0.5  # of the machine's clock, which `time_passes` moves on by 1
pick = st.integers(min_value=0, max_value=1000)


@dataclass
class Slots:
    """The consumer's limiter as the window reads it."""

    total_tokens: int
    borrowed_tokens: int = 0


@dataclass(eq=False)
class Message:
    queue: str
    tag: str
    delivery_tag: int
    held: bool = False
    started: bool = False
    deferred: bool = False
    settled: bool = False  # acknowledged, rejected or given back by the worker
    on_broker: bool = True  # unacknowledged on the broker (its acknowledgement not written)
    has_slot: bool = True
    # Settled while its consumer's cancel was on its way: the settlement may reach the
    # broker first and let it push one more.
    settled_while_cancelling: bool = False

    @property
    def in_handling(self) -> bool:
        """Delivered, not yet held, started or settled: it will soon be one of those."""
        return not (self.settled or self.held or self.started)


class WindowMachine(RuleBasedStateMachine):
    @initialize(
        limit=st.integers(min_value=1, max_value=6),
        max_window=st.integers(min_value=1, max_value=4),
        queue_count=st.integers(min_value=1, max_value=3),
        ack_group=st.integers(min_value=1, max_value=3),
    )
    def start(self, limit: int, max_window: int, queue_count: int, ack_group: int) -> None:
        self.slots = Slots(limit)
        self.ack_group = ack_group
        self.window: Window[Message] = Window(self.slots, max_window=max_window,
                                              ack_group=ack_group, group_wait=GROUP_WAIT)
        self.queues = QUEUES[:queue_count]
        self.paused: set[str] = set()
        self.stopped = False  # the whole consumer paused (outbox full, stopping)
        self.clock = 0.0
        self.ready = dict.fromkeys(self.queues, 0)
        self.registered: dict[str, ConsumerWindow] = {}  # consumers the broker pushes on
        # Cancelled, cancel-ok not yet received: what the broker may still push on each.
        self.cancelling: dict[str, tuple[ConsumerWindow, int]] = {}
        self.awaiting_cancel_ok: str | None = None
        self.broker_unacked: dict[str, int] = {}
        self.messages: list[Message] = []
        self.acks_due: list[Message] = []  # acknowledged by the worker, not yet written
        self.tags = 0
        self.plan: Iterator[Step[Message]] | None = None
        # After a full reconciliation that left runs waiting in queue i uncovered, until
        # the next one: runs pushed from queues after i, and slots freed (docs/pools.md:
        # "at most one lower run per free slot").
        self.closed_below: int | None = None
        self.lower_runs = self.freed_slots = 0

    # -- the broker ------------------------------------------------------------------

    @rule(queue=pick, count=st.integers(min_value=1, max_value=4))
    def publish(self, queue: int, count: int) -> None:
        self.ready[self.queues[queue % len(self.queues)]] += count

    def _pushable(self) -> list[ConsumerWindow]:
        return [c for c in self.registered.values()
                if self.ready[c.queue] and c.prefetch - self.broker_unacked[c.tag] > 0] + [
                c for c, in_flight in self.cancelling.values() if self.ready[c.queue] and in_flight]

    @precondition(lambda self: bool(self._pushable()))
    @rule(which=pick)
    def push(self, which: int) -> None:
        candidates = self._pushable()
        consumer = candidates[which % len(candidates)]
        assert self.slots.borrowed_tokens < self.slots.total_tokens, (
            "the broker pushed a run that finds no free slot")
        if self.closed_below is not None and self.queues.index(consumer.queue) > self.closed_below:
            self.lower_runs += 1
            assert self.lower_runs <= self.freed_slots, (
                "a lower queue got more runs than slots freed while a higher one had runs left")
        self.slots.borrowed_tokens += 1
        if consumer.tag in self.cancelling:
            self.cancelling[consumer.tag] = (consumer, self.cancelling[consumer.tag][1] - 1)
        self.window.delivered(consumer)
        self.broker_unacked[consumer.tag] += 1
        self.ready[consumer.queue] -= 1
        self.messages.append(Message(consumer.queue, consumer.tag, len(self.messages) + 1))

    @precondition(lambda self: bool(self.registered))
    @rule(which=pick)
    def broker_cancels_a_consumer(self, which: int) -> None:
        consumer = list(self.registered.values())[which % len(self.registered)]
        self.window.retire(consumer)
        del self.registered[consumer.tag]

    @precondition(lambda self: self.awaiting_cancel_ok is not None)
    @rule()
    def cancel_ok(self) -> None:
        """Everything the broker pushed on the consumer before the cancel has arrived."""
        assert self.awaiting_cancel_ok is not None
        consumer, _ = self.cancelling.pop(self.awaiting_cancel_ok)
        self.awaiting_cancel_ok = None
        self.window.retire(consumer)

    # -- the worker's runs ------------------------------------------------------------

    def _where(self, wanted: str) -> list[Message]:
        return [m for m in self.messages if getattr(m, wanted)]

    @precondition(lambda self: bool(self._where("in_handling")))
    @rule(which=pick)
    def hold_until_start_time(self, which: int) -> None:
        message = self._choose("in_handling", which)
        message.held = True
        self.window.held(message.tag)

    @precondition(lambda self: any(not m.settled and not m.started for m in self.messages))
    @rule(which=pick)
    def run_starts(self, which: int) -> None:
        candidates = [m for m in self.messages if not m.settled and not m.started]
        message = candidates[which % len(candidates)]
        message.started = True
        if self.window.may_ack_new(message.tag, held=message.held):
            self._acknowledge(message)
        else:
            message.deferred = True
            self.window.defer_ack(message, message.tag, deadline=self.clock + 1,
                                  held=message.held)

    @precondition(lambda self: any(not m.settled and not m.started for m in self.messages))
    @rule(which=pick, requeue=st.booleans())
    def settled_without_running(self, which: int, requeue: bool) -> None:
        candidates = [m for m in self.messages if not m.settled and not m.started]
        message = candidates[which % len(candidates)]
        self.window.drop_deferred(message)
        self._acknowledge(message, written=requeue)
        if requeue:
            self.ready[message.queue] += 1
        self._release(message)

    @precondition(lambda self: bool(self.acks_due))
    @rule()
    def acknowledgements_written(self) -> None:
        due = {m.delivery_tag: m for m in self.acks_due}
        self.acks_due = []
        in_hand = [m.delivery_tag for m in self.messages if not m.settled]
        group, singles = grouped_acks(sorted(due), min(in_hand, default=math.inf))
        if group is not None:
            for message in self.messages:
                if message.delivery_tag <= group and message.on_broker:
                    assert message.delivery_tag in due, (
                        "a grouped acknowledgement settled a delivery still in hand")
                    self._broker_settles(message)
        for tag in singles:
            self._broker_settles(due[tag])
        assert not any(m.on_broker for m in due.values())

    @precondition(lambda self: any(m.started and m.has_slot for m in self.messages))
    @rule(which=pick)
    def run_ends(self, which: int) -> None:
        candidates = [m for m in self.messages if m.started and m.has_slot]
        self._release(candidates[which % len(candidates)])

    @rule()
    def time_passes(self) -> None:
        self.clock += 1  # the grace of every acknowledgement deferred so far runs out

    @rule(queue=pick, pause=st.booleans())
    def pause_or_resume_a_queue(self, queue: int, pause: bool) -> None:
        name = self.queues[queue % len(self.queues)]
        (self.paused.add if pause else self.paused.discard)(name)

    @rule(stop=st.booleans())
    def stop_or_go_on_taking_runs(self, stop: bool) -> None:
        self.stopped = stop

    @rule(max_window=st.integers(min_value=1, max_value=4),
          ack_group=st.integers(min_value=1, max_value=3))
    def the_window_is_resized(self, max_window: int, ack_group: int) -> None:
        """Runs turned long or short (mq_worker.window_width)."""
        self.window.resize(max_window, ack_group)
        self.ack_group = ack_group

    # -- reconciling ------------------------------------------------------------------

    @precondition(lambda self: self.awaiting_cancel_ok is None)
    @rule()
    def reconcile_one_step(self) -> None:
        if self.plan is None:
            self.plan = self._begin_reconciliation()
        step = next(self.plan, None)
        if step is None:
            self.plan = None
        else:
            self._carry_out(step)

    @rule()
    def reconcile_with_nothing_in_between(self) -> None:
        if self.awaiting_cancel_ok is not None:
            self.cancel_ok()
        if self.plan is not None:
            for step in self.plan:
                self._carry_out(step, confirmed=True)
        free = self.window.free_slots()
        ready = [self.ready[q] for q in self._serving()]
        for step in self._begin_reconciliation():
            self._carry_out(step, confirmed=True)
        self.plan = None
        self._check_a_settled_window(free, ready)

    def _begin_reconciliation(self) -> Iterator[Step[Message]]:
        """What `RunConsumer._reconcile` reads before it carries out the plan."""
        self.closed_below = None
        serving = self._serving()
        free = self.window.free_slots()
        several = len(serving) > 1 and free > 0 and not self.stopped
        return self.window.reconcile(
            now=self.clock, stopped=self.stopped, serving=serving, paused_queues=set(self.paused),
            ready=[self.ready[q] for q in serving] if several else None, free=free,
        )

    def _check_a_settled_window(self, free: int, ready: list[int]) -> None:
        serving = self._serving()
        if self.stopped or not serving:
            assert self.window.outstanding() == 0
            return
        # No started run waits for its acknowledgement when it could be acknowledged,
        # unless for others to go with it, and then not longer than the group's wait;
        # meanwhile no window is opened or grown (the room is theirs).
        if any(self.window.may_ack_started(m.tag) for m in self._where("deferred")):
            deadline = self.window.next_deadline()
            assert self.ack_group > 1 and self.window.gathering
            assert deadline is not None and deadline <= self.clock + GROUP_WAIT
            return
        # A free slot is offered to some queue (once the runs being handled have moved
        # on: until then a single queue keeps its consumer, whose window they reopen).
        if free > 0 and (len(serving) > 1 or not self._where("in_handling")):
            assert self.window.outstanding() >= 1
        if len(serving) > 1:
            targets = allocate_windows(free, ready, self.window.max_window)
            windows = [c.open if (c := self.window.active_on(q)) else 0 for q in serving]
            assert windows == targets
            waiting = next((i for i, count in enumerate(ready) if count), None)
            if free > 0 and waiting is not None:
                assert windows[waiting] >= 1  # the first-listed queue with runs waiting
            for index, (count, target) in enumerate(zip(ready, targets, strict=True)):
                if count > target:
                    self.closed_below = self.queues.index(serving[index])
                    self.lower_runs = self.freed_slots = 0
                    assert not any(windows[index + 1:])
                    break

    # -- the consumer's side effects ------------------------------------------------

    def _carry_out(self, step: Step[Message], *, confirmed: bool = False) -> None:
        """`confirmed`: a cancel's cancel-ok arrives before anything else happens."""
        if isinstance(step, Ack):
            self._acknowledge(step.delivery)
        elif isinstance(step, Cancel):
            consumer = step.consumer
            if self.registered.pop(consumer.tag, None) is None:
                self.window.retire(consumer)  # the broker had cancelled it already
                return
            # The acknowledgements not yet written may reach the broker before the cancel.
            not_written = sum(1 for m in self.acks_due if m.tag == consumer.tag)
            self.window.cancelling(consumer)
            self.cancelling[consumer.tag] = (
                consumer, consumer.prefetch - self.broker_unacked[consumer.tag] + not_written)
            self.awaiting_cancel_ok = consumer.tag
            if confirmed:
                self.cancel_ok()
        else:
            self.tags += 1
            tag = f"mq_worker.{self.tags}"
            self.registered[tag] = self.window.opened(step.queue, tag, step.prefetch)
            self.broker_unacked[tag] = 0

    def _acknowledge(self, message: Message, *, written: bool = False) -> None:
        message.settled, message.deferred = True, False
        message.settled_while_cancelling = message.tag in self.cancelling
        self.window.acknowledged(message.tag, was_held=message.held)
        if written:
            self._broker_settles(message)
        else:
            self.acks_due.append(message)

    def _broker_settles(self, message: Message) -> None:
        message.on_broker = False
        self.broker_unacked[message.tag] -= 1
        if message.settled_while_cancelling and message.tag in self.cancelling:
            consumer, in_flight = self.cancelling[message.tag]
            self.cancelling[message.tag] = (consumer, in_flight + 1)

    def _release(self, message: Message) -> None:
        if message.has_slot:
            message.has_slot = False
            self.slots.borrowed_tokens -= 1
            self.freed_slots += 1

    def _serving(self) -> list[str]:
        return [q for q in self.queues if q not in self.paused]

    def _choose(self, wanted: str, which: int) -> Message:
        candidates = self._where(wanted)
        return candidates[which % len(candidates)]

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def slots_in_use_and_what_the_broker_may_send_stay_within_the_limit(self) -> None:
        outstanding = self.window.outstanding()
        assert self.slots.borrowed_tokens + outstanding <= self.slots.total_tokens
        assert self.window.room() >= 0

    @invariant()
    def the_window_counts_what_the_broker_may_really_send(self) -> None:
        may_send = sum(c.prefetch - self.broker_unacked[c.tag] for c in self.registered.values())
        may_send += sum(in_flight for _, in_flight in self.cancelling.values())
        may_send += sum(1 for m in self.acks_due
                        if m.settled_while_cancelling and m.tag in self.cancelling)
        # An acknowledgement is counted when decided: until written the broker may send less.
        not_written = sum(1 for m in self.acks_due if m.tag in self.registered)
        assert self.window.outstanding() == may_send + not_written

    @invariant()
    def a_slot_is_held_by_every_run_not_yet_ended(self) -> None:
        assert self.slots.borrowed_tokens == sum(m.has_slot for m in self.messages)


WindowMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=60, deadline=None
)
test_the_window_keeps_its_invariant_under_any_interleaving = WindowMachine.TestCase


def test_a_delivery_uses_the_window_it_came_through_and_takes_a_slot() -> None:
    slots = Slots(3)
    window: Window[str] = Window(slots, max_window=2)
    [consume] = list(window.plan_single("q"))
    assert consume == Consume("q", 2)
    consumer = window.opened("q", "t1", 2)
    assert window.room() == 1
    window.delivered(consumer)
    slots.borrowed_tokens += 1
    assert (window.outstanding(), window.room()) == (1, 1)
    assert window.statistics() == WindowStatistics(
        limit=3, slots_in_use=1, outstanding=1, active_consumers=1, waiting_acks=0,
        max_window=2)


def test_acknowledging_a_started_run_waits_when_it_would_reopen_beyond_the_limit() -> None:
    slots = Slots(1)
    window: Window[str] = Window(slots, max_window=1)
    consumer = window.opened("q", "t1", 1)
    window.delivered(consumer)
    slots.borrowed_tokens += 1
    assert not window.may_ack_started("t1")  # the run keeps its slot: no room to reopen
    window.retire(consumer)
    assert window.may_ack_started("t1")  # a cancelled consumer reopens nothing


def test_runs_waiting_for_their_start_time_do_not_keep_the_window_closed() -> None:
    slots = Slots(3)
    window: Window[str] = Window(slots, max_window=1)
    consumer = window.opened("q", "t1", 1)
    window.delivered(consumer)
    slots.borrowed_tokens += 1
    assert list(window.plan_single("q")) == []  # its run is being handled: wait for it
    window.held("t1")
    plan = window.plan_single("q")
    assert next(plan) == Cancel(consumer)
    window.retire(consumer)
    assert list(plan) == [Consume("q", 1)]


def test_a_plan_sizes_each_new_window_by_the_room_left_when_it_gets_there() -> None:
    slots = Slots(3)
    window: Window[str] = Window(slots, max_window=2)
    plan = window.plan_by_priority(["high", "low"], ready=[1, 2], free=3)
    assert next(plan) == Consume("high", 1)
    high = window.opened("high", "t1", 1)
    # Before the next step: a run of high arrives, starts, and is acknowledged.
    window.delivered(high)
    slots.borrowed_tokens += 1
    assert window.may_ack_started("t1")
    window.acknowledged("t1", was_held=False)
    assert window.room() == 1
    assert list(plan) == [Consume("low", 1)]  # not the 2 allotted when the plan began


def test_a_deferred_acknowledgement_goes_as_soon_as_a_cancelled_consumer_makes_room() -> None:
    slots = Slots(2)
    window: Window[str] = Window(slots, max_window=1)
    high, middle = window.opened("high", "t1", 1), window.opened("middle", "t2", 1)
    window.delivered(high)
    slots.borrowed_tokens += 1
    assert not window.may_ack_started("t1")  # middle's window takes the last slot
    window.defer_ack("run", "t1", deadline=10.0)
    # middle is paused: cancelling its consumer makes room for the acknowledgement,
    # which should not wait for its grace to run out (high has no window meanwhile).
    plan = window.reconcile(now=0.0, stopped=False, serving=["high"], paused_queues={"middle"},
                            ready=None, free=1)
    assert next(plan) == Cancel(middle)
    window.retire(middle)
    window.forget_if_drained(middle)
    assert next(plan, None) == Ack("run")


@pytest.mark.anyio
async def test_the_consumer_owns_the_slots_of_its_limit_and_reports_them_frozen() -> None:
    async def handle(delivery: Delivery) -> None:
        raise AssertionError("nothing is delivered here")

    async with anyio.create_task_group() as tg:
        consumer = RunConsumer(limit=3, window=2, ack_grace=1.0, handle=handle, spawn=tg)
        assert (consumer.limit, consumer.free_slots, consumer.slots_in_use) == (3, 3, 0)
        statistics = consumer.statistics()
        assert statistics == ConsumerStatistics(
            consumes=0, cancels=0, deferred_acks=0, overshoot=0, ack_frames=0,
            window=WindowStatistics(limit=3, slots_in_use=0, outstanding=0, active_consumers=0,
                                    waiting_acks=0, max_window=2))
        with pytest.raises(dataclasses.FrozenInstanceError):
            statistics.consumes = 1  # type: ignore[misc]


def test_one_acknowledgement_covers_the_tags_due_below_the_first_delivery_in_hand() -> None:
    assert grouped_acks([1, 2, 3, 5], math.inf) == (5, [])
    # 4 waits for its start time: `multiple` up to 5 would settle it.
    assert grouped_acks([1, 2, 3, 5, 6], 4) == (3, [5, 6])
    assert grouped_acks([5, 6], 4) == (None, [5, 6])
    assert grouped_acks([], 1) == (None, [])


@pytest.mark.parametrize(("limit", "window"), [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2), (6, 3),
                                               (8, 4), (16, 8), (100, 50)])
def test_the_narrow_default_window_is_half_the_limit_and_at_least_two(limit: int,
                                                                      window: int) -> None:
    # Up to half the limit busy, a started run is acknowledged at once (the broker could
    # otherwise push a run beyond the free slots); beyond it, acknowledgements wait for
    # free slots and go in groups of half the window, one settlement on the quorum queue
    # for several runs (docs/benchmarks.md). With one, no two acknowledgements go together.
    settings = WorkerSettings(url=["amqp://guest:guest@127.0.0.1/"], limit=limit)
    assert (settings.narrow_window, settings.wide_window) == (window, window)  # fixed
    given = WorkerSettings(url=["amqp://guest:guest@127.0.0.1/"], limit=limit, window=3)
    assert (given.narrow_window, given.wide_window) == (min(window, 3) if limit <= 3 else 3, 3)
    # The whole limit asked for: wide while runs are short (mq_worker.window_width).
    whole = WorkerSettings(url=["amqp://guest:guest@127.0.0.1/"], limit=limit, window=limit)
    assert (whole.narrow_window, whole.wide_window) == (window, limit)
    assert WorkerSettings(url=["amqp://guest:guest@127.0.0.1/"], limit=limit,
                          window=1).window == 1


@pytest.mark.parametrize(("limit", "paired"), [(3, False), (4, True), (6, True)])
def test_a_window_of_two_pairs_its_acknowledgements_only_where_a_pair_can_fit(
        limit: int, paired: bool) -> None:
    # Two runs pushed together and started. With room for both (limit 4 or more) they are
    # acknowledged together; at limit 3 room comes one at a time, and a first
    # acknowledgement held back for a second would only wait (and keep the broker waiting).
    _, window, _ = _delivered(limit, 2, 2, ack_group=ack_group(2, limit))
    window.defer_ack("a", "t1", deadline=10.0)  # started first, its partner being started
    assert window.may_ack_new("t1") is not paired  # the second: at once, or with "a"
    if paired:
        window.defer_ack("b", "t1", deadline=10.0)
        assert _acks(window, now=0.0) == [Ack("a"), Ack("b")]
    else:
        assert _acks(window, now=0.0) == [Ack("a")]
        assert window.next_deadline() is None  # nothing waits for a group


def _at_capacity(ack_group: int) -> tuple[Slots, Window[str], ConsumerWindow]:
    """Limit 4, window 4: four runs started, each acknowledgement deferred (no room)."""
    slots = Slots(4)
    window: Window[str] = Window(slots, max_window=4, ack_group=ack_group, group_wait=0.5)
    consumer = window.opened("q", "t1", 4)
    for run in "abcd":
        window.delivered(consumer)
        slots.borrowed_tokens += 1
        assert not window.may_ack_new("t1")
        window.defer_ack(run, "t1", deadline=10.0)
    return slots, window, consumer


def _delivered(limit: int, prefetch: int, runs: int, *, ack_group: int = 1
               ) -> tuple[Slots, Window[str], ConsumerWindow]:
    """One consumer "t1" of `prefetch` on "q", `runs` runs pushed on it, each in its slot."""
    slots = Slots(limit)
    window: Window[str] = Window(slots, max_window=prefetch, ack_group=ack_group,
                                 group_wait=0.5)
    consumer = window.opened("q", "t1", prefetch)
    for _ in range(runs):
        window.delivered(consumer)
        slots.borrowed_tokens += 1
    return slots, window, consumer


def _pushed(runs: int) -> Window[str]:
    """Limit 8, window 4 (groups of 2): `runs` runs pushed together, all being started."""
    return _delivered(8, 4, runs, ack_group=2)[1]


def _acks(window: Window[str], now: float) -> list[Step[str]]:
    """One reconciliation's steps, each carried out before the next is decided."""
    steps: list[Step[str]] = []
    for step in window.reconcile(now=now, stopped=False, serving=["q"], paused_queues=set(),
                                 ready=None, free=window.free_slots()):
        steps.append(step)
        if isinstance(step, Ack):
            window.acknowledged("t1", was_held=False)
    return steps


def test_deferred_acknowledgements_wait_briefly_to_go_as_a_group() -> None:
    # Each acknowledgement is a settlement the quorum queue replicates; one `multiple`
    # frame for several costs it about what one for a single delivery does.
    slots, window, _ = _at_capacity(ack_group=2)
    slots.borrowed_tokens -= 1  # one run ends: one acknowledgement fits
    assert _acks(window, now=0.0) == []
    assert window.next_deadline() == 0.5  # it waits for a second one that long at most
    slots.borrowed_tokens -= 1  # another ends: both go together, oldest first
    assert _acks(window, now=0.1) == [Ack("a"), Ack("b")]
    assert window.next_deadline() == 10.0


def test_a_deferred_acknowledgement_goes_alone_once_the_group_wait_is_over() -> None:
    slots, window, _ = _at_capacity(ack_group=2)
    slots.borrowed_tokens -= 1
    assert _acks(window, now=0.0) == []
    assert _acks(window, now=0.5) == [Ack("a")]
    assert window.next_deadline() == 10.0


def test_without_a_group_a_deferred_acknowledgement_goes_as_soon_as_it_fits() -> None:
    slots, window, _ = _at_capacity(ack_group=1)
    slots.borrowed_tokens -= 1
    assert _acks(window, now=0.0) == [Ack("a")]


def test_a_started_run_is_acknowledged_after_those_already_waiting() -> None:
    # In order, so that one `multiple` covers them all: acknowledging a later delivery
    # first would leave the waiting ones below it to frames of their own.
    window = _pushed(2)
    window.defer_ack("waiting", "t1", deadline=10.0)
    assert window.fits_one_more()
    assert not window.may_ack_new("t1")  # it would fit, but one waits before it
    window.defer_ack("second", "t1", deadline=10.0)
    assert _acks(window, now=0.0) == [Ack("waiting"), Ack("second")]  # a group fits
    assert window.may_ack_new("t1")


def test_deferred_acknowledgements_of_a_cancelled_consumer_go_at_once() -> None:
    _, window, consumer = _at_capacity(ack_group=4)
    window.retire(consumer)
    assert _acks(window, now=0.0)[:4] == [Ack("a"), Ack("b"), Ack("c"), Ack("d")]


def test_with_several_queues_acknowledgements_that_fit_go_before_windows_are_shared() -> None:
    # Limit 6, window 4 (groups of 2), queues high and low. Three started runs of high
    # wait for room; one slot frees. Waiting for a second would let a window opened on
    # low meanwhile take that room (they would then wait for --ack-grace): with several
    # queues an acknowledgement that fits goes at once, before the plan.
    slots = Slots(6, borrowed_tokens=1)  # a run of a consumer gone since
    window: Window[str] = Window(slots, max_window=4, ack_group=2, group_wait=0.5)
    high = window.opened("high", "h", 4)
    low = window.opened("low", "l", 1)
    window.delivered(low)
    slots.borrowed_tokens += 1
    window.held("l")  # low's run waits for its start time: its window is closed
    for run in "abc":
        window.delivered(high)
        slots.borrowed_tokens += 1
        window.defer_ack(run, "h", deadline=10.0)
    assert window.room() == 0
    slots.borrowed_tokens -= 1  # that run ends: one acknowledgement fits
    steps: list[Step[str]] = []
    for step in window.reconcile(now=0.0, stopped=False, serving=["high", "low"],
                                 paused_queues=set(), ready=[1, 3], free=window.free_slots()):
        steps.append(step)
        if isinstance(step, Ack):
            window.acknowledged("h", was_held=False)
        elif isinstance(step, Cancel):
            window.retire(step.consumer)
        elif isinstance(step, Consume):
            window.opened(step.queue, f"t{len(steps)}", step.prefetch)
    assert steps[0] == Ack("a")


def test_a_started_run_waits_for_the_runs_delivered_with_it_to_start() -> None:
    # The broker pushes several runs at once; acknowledged together once all have
    # started, one frame settles them all.
    window = _pushed(3)
    assert window.fits_one_more()
    assert not window.may_ack_new("t1")  # two more are being started
    window.defer_ack("a", "t1", deadline=10.0)
    assert _acks(window, now=0.0) == []
    assert not window.may_ack_new("t1")  # one more is being started
    window.defer_ack("b", "t1", deadline=10.0)
    assert _acks(window, now=0.0) == [Ack("a"), Ack("b")]  # a group fits
    assert window.may_ack_new("t1")  # the last one: nothing waits before it, none after


def test_runs_starting_during_a_reallocation_keep_the_room_for_their_acknowledgements() -> None:
    # Limit 8, window 4 (groups of 2), queues high and low. While the worker waits for
    # the broker to cancel low's consumer, two runs of high pushed together start: their
    # acknowledgements wait for each other, and the window then opened on low must leave
    # them their room, or they would wait for --ack-grace (and a consumer re-size).
    slots = Slots(8)
    window: Window[str] = Window(slots, max_window=4, ack_group=2, group_wait=0.5)
    high = window.opened("high", "h", 3)
    low = window.opened("low", "l", 1)
    for _ in range(2):
        window.delivered(high)
        slots.borrowed_tokens += 1
    window.delivered(low)
    slots.borrowed_tokens += 1
    window.held("l")
    acknowledged: list[str] = []

    def reconcile(now: float) -> list[Step[str]]:
        steps: list[Step[str]] = []
        for step in window.reconcile(now=now, stopped=False, serving=["high", "low"],
                                     paused_queues=set(), ready=[1, 10],
                                     free=window.free_slots()):
            steps.append(step)
            if isinstance(step, Ack):
                acknowledged.append(step.delivery)
                window.acknowledged("h", was_held=False)
            elif isinstance(step, Cancel):
                window.retire(step.consumer)
                if step.consumer is low:
                    for run in "ab":  # awaiting cancel-ok, high's two runs start
                        if window.may_ack_new("h"):
                            acknowledged.append(run)
                            window.acknowledged("h", was_held=False)
                        else:
                            window.defer_ack(run, "h", deadline=now + 10.0)
            elif isinstance(step, Consume):
                window.opened(step.queue, f"t{len(steps)}", step.prefetch)
        return steps

    reconcile(0.0)
    reconcile(0.01)
    assert acknowledged == ["a", "b"]


def test_a_held_run_waiting_for_its_acknowledgement_is_counted_once() -> None:
    # Window 6 (groups of 3): x was held for its start time, y and z pushed with it.
    # With x and y waiting, z is still being started: the group waits for it.
    slots = Slots(12)
    window: Window[str] = Window(slots, max_window=6, ack_group=3, group_wait=0.5)
    consumer = window.opened("q", "t1", 6)
    for _ in "xyz":
        window.delivered(consumer)
        slots.borrowed_tokens += 1
    window.held("t1")
    assert not window.may_ack_new("t1", held=True)  # y and z are being started
    window.defer_ack("x", "t1", deadline=10.0, held=True)
    window.defer_ack("y", "t1", deadline=10.0)
    assert _acks(window, now=0.0) == []
    window.defer_ack("z", "t1", deadline=10.0)
    assert _acks(window, now=0.0) == [Ack("x"), Ack("y"), Ack("z")]


def test_growing_a_higher_queues_window_comes_before_a_lower_queues_acknowledgements() -> None:
    # Limit 8, window 4, queues high, middle and low; middle's three started runs wait
    # for room. Runs wait in high only: high gets its windows, middle one, low none.
    slots = Slots(8, borrowed_tokens=2)
    window: Window[str] = Window(slots, max_window=4, ack_group=2, group_wait=0.5)
    window.opened("high", "h", 1)
    middle = window.opened("middle", "m", 3)
    window.opened("low", "l", 2)
    for run in "abc":
        window.delivered(middle)
        slots.borrowed_tokens += 1
        window.defer_ack(run, "m", deadline=10.0)
    assert window.room() == 0
    for step in window.reconcile(now=0.0, stopped=False, serving=["high", "middle", "low"],
                                 paused_queues=set(), ready=[2, 0, 0], free=3):
        if isinstance(step, Ack):
            window.acknowledged("m", was_held=False)
        elif isinstance(step, Cancel):
            window.retire(step.consumer)
            window.forget_if_drained(step.consumer)
        else:
            window.opened(step.queue, f"t-{step.queue}", step.prefetch)
    queues = ["high", "middle", "low"]
    assert [c.open if (c := window.active_on(q)) else 0 for q in queues] == [2, 1, 0]


def test_a_settlement_while_the_cancel_is_on_its_way_may_let_the_broker_push_one_more() -> None:
    """aiormq writes a cancel a loop turn later: a settlement decided meanwhile may reach
    the broker first, which then may push one more on that consumer."""
    slots, window, consumer = _delivered(4, 4, 3)
    window.cancelling(consumer)
    assert window.outstanding() == 1
    assert not window.may_ack_started("t1")  # it would reopen the window: no room for that
    window.acknowledged("t1", was_held=False)  # a run given back, its slot freed
    slots.borrowed_tokens -= 1
    assert (window.outstanding(), window.room()) == (2, 0)
    window.retire(consumer)  # cancel-ok: it pushes nothing more
    assert window.may_ack_started("t1") and window.room() == 2


def test_a_narrowed_window_replaces_a_consumer_wider_than_it() -> None:
    _, window, consumer = _delivered(8, 8, 1)
    window.resize(4, 2)
    plan = window.plan_single("q")
    assert next(plan) == Cancel(consumer)
    window.retire(consumer)
    assert list(plan) == [Consume("q", 4)]



def _carry_out_cancels(window: Window[str], plan: Iterator[Step[str]]) -> list[Step[str]]:
    steps = []
    for step in plan:
        steps.append(step)
        if isinstance(step, Cancel):
            window.cancelling(step.consumer)
            window.retire(step.consumer)
    return steps


def test_a_window_grows_only_when_its_replacement_is_wider() -> None:
    """Cancelling a consumer whose runs are still in hand frees no room for its successor:
    growing then would re-register it at the same width, or narrower."""
    slots = Slots(8)
    window: Window[str] = Window(slots, max_window=8, ack_group=4)
    slots.borrowed_tokens = 2  # two older runs
    assert list(window.plan_single("q")) == [Consume("q", 6)]
    prefetch = 6
    consumer = window.opened("q", "t1", prefetch)
    for _ in range(6):
        window.delivered(consumer)
        slots.borrowed_tokens += 1
    slots.borrowed_tokens -= 2  # the older runs end; the six are in hand
    assert _carry_out_cancels(window, window.plan_single("q")) == []
    for _ in range(6):
        window.acknowledged("t1", was_held=False)
        slots.borrowed_tokens -= 1
    assert _carry_out_cancels(window, window.plan_single("q")) == [Cancel(consumer),
                                                                  Consume("q", 8)]


def test_a_cancel_for_an_acknowledgement_that_waited_too_long_says_so() -> None:
    _, window, consumer = _delivered(2, 2, 2)
    window.defer_ack("run", "t1", deadline=1.0)
    plan = window.reconcile(now=1.0, stopped=False, serving=["q"], paused_queues=(), ready=None,
                            free=0)
    assert next(plan) == Cancel(consumer, overdue=True)


def test_a_narrowed_window_replaces_a_wider_consumer_of_several_queues_too() -> None:
    slots = Slots(8)
    window: Window[str] = Window(slots, max_window=4)
    high = window.opened("high", "t1", 4)
    window.resize(2, 1)
    steps = _carry_out_cancels(window, window.plan_by_priority(["high", "low"], [9, 9], 8))
    assert steps[0] == Cancel(high)
    assert max(s.prefetch for s in steps if isinstance(s, Consume)) == 2


def test_acknowledgements_that_fit_at_their_deadline_go_rather_than_cancel_the_consumer() -> None:
    """Held back for a group (others are still being started) until their deadline: they
    fit, so they go; a cancel would tell the width its runs are long."""
    slots, window, _ = _delivered(8, 8, 8, ack_group=4)
    for run in ("a", "b"):
        window.defer_ack(run, "t1", deadline=1.0)
    slots.borrowed_tokens -= 2  # both runs have ended; six others are still being started
    assert _acks(window, now=0.9) == []  # gathering: fewer fit than a group
    assert _acks(window, now=1.0) == [Ack("a"), Ack("b")]
