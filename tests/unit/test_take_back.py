"""What a worker back from a lost connection takes from a limit's token queue (no broker).

Its runs' tokens went back to the broker with the connection, and so may those of other
workers cut off after it: it must take back its own and only those. A token of another
worker's, free at the broker, is one whose runs may still be running; a run elsewhere
that takes it holds it first, but the worker that held it does not, so taking it here
would let two runs use it at once (docs/pools.md, "Telling a released token from a
lost one"). The token queue is played by a channel that behaves like RabbitMQ's in
`tx.select` mode: acknowledgements, requeues and publishes take effect at the commit,
and a token put back unacknowledged comes first again, marked redelivered.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, cast

import aiormq.abc
import anyio
import pytest
from pamqp import commands as spec

from mq_worker import slot_requests
from mq_worker.control import TokenMessage, encode
from mq_worker.limits import ControlState, Limit
from mq_worker.slot_requests import Lease, SlotRequests
from mq_worker.slots import SlotGate
from mq_worker.spares import HeldToken
from mq_worker.topology import limit_queue_name

TARGET = "key:db"
pytestmark = pytest.mark.anyio


class TokenQueue:
    """A channel to TARGET's token queue: (number, version, marked) tokens, in order."""

    def __init__(self, *tokens: tuple[int, int, bool]) -> None:
        self.ready: deque[tuple[bytes, bool]] = deque(
            (self.body(number, version), marked) for number, version, marked in tokens)
        self.held: dict[int, tuple[bytes, bool]] = {}
        self.pending: list[tuple[str, Any]] = []
        self.tags = 0
        self.gets = self.commits = 0
        self.is_closed = False
        self.connection = SimpleNamespace(channel=self._channel)
        self.later: list[tuple[int, int, bool]] = []  # back once the queue first runs dry
        self.dry_before_later = 1  # ... or runs dry this many times
        self.get_seconds = 0.0  # how long a get takes (a round trip)
        self.on_get: tuple[int, Callable[[], Awaitable[None]]] | None = None  # (get number,
        # what happens then: a run ends or is stopped)

    @staticmethod
    def body(number: int, version: int) -> bytes:
        return encode(TokenMessage(target=TARGET, number=number, version=version))

    def tokens(self) -> list[tuple[int, int, bool]]:
        """What the queue holds ready, in order: (number, version, marked)."""
        out = []
        for body, marked in self.ready:
            token = TokenMessage.model_validate_json(body)
            out.append((token.number, token.version, marked))
        return out

    async def basic_get(self, queue: str, no_ack: bool) -> Any:
        assert queue == limit_queue_name(TARGET) and not no_ack
        self.gets += 1
        if self.on_get is not None and self.gets == self.on_get[0]:
            await self.on_get[1]()
        if self.get_seconds:
            await anyio.sleep(self.get_seconds)
        if not self.ready and self.later and self.dry_before_later > 1:
            self.dry_before_later -= 1
            return SimpleNamespace(delivery=spec.Basic.GetEmpty())
        if not self.ready and self.later:
            self.ready.extend((self.body(n, v), m) for n, v, m in self.later)
            self.later = []
            return SimpleNamespace(delivery=spec.Basic.GetEmpty())
        if not self.ready:
            return SimpleNamespace(delivery=spec.Basic.GetEmpty())
        body, marked = self.ready.popleft()
        self.tags += 1
        self.held[self.tags] = (body, marked)
        return SimpleNamespace(body=body, delivery=spec.Basic.GetOk(
            delivery_tag=self.tags, redelivered=marked, exchange="", routing_key=queue,
            message_count=0))  # (so the scan gets every token: see `SlotRequests._sweep`)

    async def basic_ack(self, delivery_tag: int) -> None:
        self.pending.append(("ack", delivery_tag))

    async def basic_nack(self, delivery_tag: int, requeue: bool, wait: bool = True) -> None:
        assert requeue
        self.pending.append(("nack", delivery_tag))

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str,
                            properties: Any) -> None:
        assert routing_key == limit_queue_name(TARGET)
        self.pending.append(("publish", body))

    async def tx_commit(self) -> None:
        self.commits += 1
        for kind, value in self.pending:
            if kind == "ack":
                del self.held[value]
            elif kind == "nack":
                self.ready.appendleft((self.held.pop(value)[0], True))
            else:
                self.ready.append((value, False))
        self.pending = []

    async def _channel(self, publisher_confirms: bool) -> Any:
        return SimpleNamespace(  # the waiting queue: nobody waits
            is_closed=False, connection=self.connection,
            basic_get=lambda *_, **__: _empty())


async def _empty() -> Any:
    return SimpleNamespace(delivery=spec.Basic.GetEmpty())


def requests(limit: int = 3, ranges: tuple[tuple[int, int, int], ...] = ((0, 3, 1),)
             ) -> SlotRequests:
    return SlotRequests(ControlState(limits={TARGET: Limit(TARGET, limit, ranges)}))


async def scan(queue: TokenQueue, wanted: set[tuple[int, int]], *, stand_ins: bool = False,
               **limit: Any) -> tuple[dict[tuple[int, int], HeldToken], int]:
    return await requests(**limit).scan(cast(aiormq.abc.AbstractChannel, queue), TARGET,
                                        wanted, stand_ins=stand_ins)


async def test_its_own_token_is_kept_and_another_worker_s_is_put_back_still_marked() -> None:
    # B's token, lost after A's, comes first: A must not take it for its run.
    queue = TokenQueue((1, 1, True), (0, 1, True))
    kept, fresh = await scan(queue, {(0, 1)})
    assert [(t.number, t.version) for t in kept.values()] == [(0, 1)]
    assert fresh == set()
    assert queue.tokens() == [(1, 1, True)]  # its next taker still holds it first
    assert list(queue.held) == [2] and queue.commits == 1


async def test_a_free_token_taken_on_the_way_is_given_back_as_a_new_message() -> None:
    queue = TokenQueue((2, 1, False), (0, 1, True))
    kept, fresh = await scan(queue, {(0, 1)})
    assert list(kept) == [(0, 1)] and fresh == {(2, 1)}
    assert queue.tokens() == [(2, 1, False)]  # given back as a release gives it: unmarked


async def test_the_scan_stops_as_soon_as_every_own_token_is_found() -> None:
    queue = TokenQueue((0, 1, True), (1, 1, True), (2, 1, False))
    kept, _ = await scan(queue, {(0, 1)})
    assert list(kept) == [(0, 1)]
    assert queue.gets == 1 and queue.commits == 0  # nothing to put back


async def test_an_empty_queue_finds_nothing_and_puts_nothing_back() -> None:
    queue = TokenQueue()
    assert await scan(queue, {(0, 1)}) == ({}, set())
    assert queue.commits == 0


async def test_a_partial_find_keeps_what_it_found_and_puts_every_other_token_back() -> None:
    queue = TokenQueue((1, 1, True), (0, 1, True), (2, 1, False))
    kept, fresh = await scan(queue, {(0, 1), (2, 1), (1, 9)})
    assert sorted(kept) == [(0, 1), (2, 1)]
    assert fresh == set()
    assert queue.tokens() == [(1, 1, True)]  # number 1, but not the version it held


async def test_a_token_recreated_under_a_new_version_while_cut_off_is_not_its_own() -> None:
    # Shrunk to 1 and grown to 2 again while the worker was away: its token 1 of
    # version 1 was destroyed, and token 1 of version 5 is another slot.
    queue = TokenQueue((1, 5, False))
    kept, fresh = await scan(queue, {(1, 1)}, limit=2, ranges=((0, 1, 1), (1, 2, 5)))
    assert kept == {} and fresh == {(1, 5)}
    assert queue.tokens() == [(1, 5, False)]


async def test_tokens_no_longer_valid_are_destroyed_even_its_own() -> None:
    # The limit shrank to 1 while the worker was away: its token 2 is over it.
    queue = TokenQueue((2, 1, True), (0, 1, True))
    kept, _ = await scan(queue, {(2, 1), (0, 1)}, limit=1, ranges=((0, 1, 1),))
    assert list(kept) == [(0, 1)]
    assert queue.tokens() == [] and list(queue.held) == [2]


async def test_a_token_held_by_another_worker_s_scan_is_found_on_a_later_pass(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slot_requests, "TAKE_BACK_PAUSE_SECONDS", (0.0, 0.0))
    queue = TokenQueue((1, 1, True))
    queue.later = [(0, 1, True)]  # put back by the other scan meanwhile
    lease = Lease(None, [HeldToken(TARGET, 5, 0, 1)])
    found, given_back = await requests().take_back(cast(aiormq.abc.AbstractChannel, queue),
                                                   [lease])
    assert list(found) == [(TARGET, 0, 1)] and not given_back


async def test_a_token_held_by_other_scans_for_longer_is_looked_for_until_the_deadline(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Several workers cut off together scan the queue at once, each holding what it
    # took until its pass ends: a worker's token can be held elsewhere pass after pass.
    # Its run goes on if the token is found before its deadline, however many passes.
    monkeypatch.setattr(slot_requests, "TAKE_BACK_PAUSE_SECONDS", (0.0, 0.0))
    queue = TokenQueue((1, 1, True))
    queue.later, queue.dry_before_later = [(0, 1, True)], slot_requests.TAKE_BACK_PASSES + 2
    lease = Lease(None, [HeldToken(TARGET, 5, 0, 1)])
    found, _ = await requests().take_back(cast(aiormq.abc.AbstractChannel, queue), [lease],
                                          until=time.monotonic() + 60)
    assert list(found) == [(TARGET, 0, 1)]


async def test_past_its_deadline_a_worker_stops_looking_after_the_passes() -> None:
    queue = TokenQueue((1, 1, True))
    queue.later, queue.dry_before_later = [(0, 1, True)], 100
    lease = Lease(None, [HeldToken(TARGET, 5, 0, 1)])
    found, _ = await requests().take_back(cast(aiormq.abc.AbstractChannel, queue), [lease],
                                          until=time.monotonic())
    assert found == {} and queue.gets == 2 * slot_requests.TAKE_BACK_PASSES


class Gate:
    """A worker's slot gate back from a lost connection, with runs that held tokens."""

    def __init__(self, queue: TokenQueue, limit: int = 3) -> None:
        self.lost: list[tuple[str, str]] = []
        self.gate = SlotGate(ControlState(limits={TARGET: Limit(TARGET, limit,
                                                                ((0, limit, 1),))}),
                             on_slot_lost=lambda run, target: self.lost.append((run, target)))
        self.old = SimpleNamespace(is_closed=True)
        self.queue = queue

    def running(self, run_id: str, *numbers: int) -> Lease:
        lease = Lease(cast(aiormq.abc.AbstractChannel, self.old),
                      [HeldToken(TARGET, 100 + n, n, 1) for n in numbers], run_id=run_id)
        self.gate._leases.add(lease)
        return lease

    async def reconnect(self) -> None:
        channel = cast(aiormq.abc.AbstractChannel, self.queue)
        self.gate.bind(channel, channel)
        await self.gate.reclaim()


async def test_a_run_whose_own_token_is_held_elsewhere_is_stopped_even_with_another_free(
) -> None:
    # Token 0 was taken by a run elsewhere; token 1, free, is that of a worker cut off
    # after this one. The run of token 0 is stopped; token 1 stays as it was.
    gate = Gate(TokenQueue((1, 1, True)))
    lease = gate.running("a", 0)
    await gate.reconnect()
    assert gate.lost == [("a", TARGET)]
    assert lease.tokens == []
    assert gate.queue.tokens() == [(1, 1, True)]


async def test_two_runs_of_one_target_each_take_back_their_own_token() -> None:
    gate = Gate(TokenQueue((2, 1, True), (1, 1, True), (0, 1, False)))
    first, second = gate.running("a", 1), gate.running("b", 2)
    await gate.reconnect()
    assert gate.lost == []
    assert [(t.number, t.returned) for t in first.tokens] == [(1, False)]  # no hold: its own
    assert [(t.number, t.returned) for t in second.tokens] == [(2, False)]
    assert first.channel is gate.queue and second.channel is gate.queue
    assert gate.queue.tokens() == [(0, 1, False)]


async def test_a_spare_lost_with_the_connection_is_not_taken_back() -> None:
    # Token 2 was this worker's spare: no run holds it, so it stays at the broker, marked.
    gate = Gate(TokenQueue((2, 1, True), (0, 1, True)))
    lease = gate.running("a", 0)
    await gate.reconnect()
    assert [t.number for t in lease.tokens] == [0]
    assert gate.queue.tokens() == [(2, 1, True)]


async def test_a_run_of_a_limit_removed_while_cut_off_goes_on_holding_nothing() -> None:
    gate = Gate(TokenQueue((0, 1, True)))
    lease = gate.running("a", 0)
    lease.tokens.append(HeldToken("key:gone", 7, 0, 1))  # `limit rm` meanwhile
    await gate.reconnect()
    assert gate.lost == []
    assert [(t.target, t.number) for t in lease.tokens] == [(TARGET, 0)]


async def test_a_run_whose_token_is_found_goes_on_while_another_s_is_looked_for(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Token 0 is back at once; token 1 never is. Looking for token 1 until the deadline
    # must not keep the run of token 0 from being taken back: at the deadline, the runs
    # not taken back are stopped, and only the run of token 1 may be.
    monkeypatch.setattr(slot_requests, "TAKE_BACK_PAUSE_SECONDS", (0.01, 0.01))
    gate = Gate(TokenQueue((0, 1, True)))
    gate.queue.get_seconds = 0.05  # (a pass that starts before the deadline ends after it)
    first, _ = gate.running("a", 0), gate.running("b", 1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(gate.gate.stop_runs_cut_off)
        gate.gate.bind(None, None)  # the connection is lost
        await gate.reconnect()  # (back at once: the deadline is 1 s after the loss)
        tg.cancel_scope.cancel()
    assert gate.lost == [("b", TARGET)]
    assert first.channel is gate.queue and [t.number for t in first.tokens] == [0]


async def test_a_run_takes_the_free_token_behind_a_lost_one_and_leaves_the_lost_one() -> None:
    # Token 0 came back with its worker's connection (RabbitMQ hands it first); that
    # worker, back in a moment, takes back only token 0: a run elsewhere takes token 1.
    queue = TokenQueue((0, 1, True), (1, 1, False))
    lease = Lease(cast(aiormq.abc.AbstractChannel, queue))
    assert await requests().take(TARGET, lease)
    assert [(t.number, t.returned) for t in lease.tokens] == [(1, False)]
    assert queue.tokens() == [(0, 1, True)] and len(queue.held) == 1


async def test_with_no_free_token_behind_it_a_lost_token_is_taken_marked() -> None:
    for tokens in [((0, 1, True),), ((0, 1, True), (1, 1, True))]:
        queue = TokenQueue(*tokens)
        lease = Lease(cast(aiormq.abc.AbstractChannel, queue))
        assert await requests().take(TARGET, lease)
        assert [(t.number, t.returned) for t in lease.tokens] == [(0, True)]  # held first
        assert queue.tokens() == [(n, v, m) for n, v, m in tokens[1:]]


async def test_a_run_whose_own_token_was_taken_goes_on_with_a_released_one_in_its_stead(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Token 0 was taken by a run elsewhere (which holds it before starting); token 1, lost
    # with another worker's connection, is marked; token 2 was given back by a run that
    # ended: no run can be using it, so the run of token 0 goes on holding it instead.
    monkeypatch.setattr(slot_requests, "TAKE_BACK_PAUSE_SECONDS", (0.0, 0.0))
    gate = Gate(TokenQueue((1, 1, True), (2, 1, False)))
    lease = gate.running("a", 0)
    await gate.reconnect()
    assert gate.lost == []
    assert [(t.number, t.returned) for t in lease.tokens] == [(2, False)]
    assert lease.channel is gate.queue
    assert gate.queue.tokens() == [(1, 1, True)]  # the marked one left as it was


async def test_a_released_token_stands_in_only_once_its_own_is_not_found_in_time(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its own token comes back (from another worker's scan) within the passes: it takes
    # that one and leaves the released one to others.
    monkeypatch.setattr(slot_requests, "TAKE_BACK_PAUSE_SECONDS", (0.0, 0.0))
    queue = TokenQueue((2, 1, False))
    queue.later, queue.dry_before_later = [(0, 1, True)], 2
    gate = Gate(queue)
    lease = gate.running("a", 0)
    await gate.reconnect()
    assert [t.number for t in lease.tokens] == [0]
    assert gate.queue.tokens() == [(2, 1, False)]


async def test_a_stand_in_is_never_a_marked_token_nor_one_of_another_version() -> None:
    queue = TokenQueue((1, 1, True), (1, 5, False))
    kept, fresh = await scan(queue, {(0, 1)}, stand_ins=True, limit=2,
                             ranges=((0, 1, 1), (1, 2, 5)))
    assert [(t.number, t.version) for t in kept.values()] == [(1, 5)]  # a valid one
    assert fresh == set()
    queue = TokenQueue((1, 1, True))
    assert await scan(queue, {(0, 1)}, stand_ins=True) == ({}, set())
    assert queue.tokens() == [(1, 1, True)]


async def test_a_token_taken_back_for_a_run_that_ended_meanwhile_is_given_back() -> None:
    # The run ends while its worker looks for its token: what the scan kept for it is
    # nobody's, and must go back to the queue (as it came: marked), not stay held.
    gate = Gate(TokenQueue((0, 1, True), (1, 1, False)))
    lease = gate.running("a", 0)

    async def run_ends() -> None:
        await gate.gate.release(lease)

    gate.queue.on_get = (1, run_ends)
    await gate.reconnect()
    assert sorted(gate.queue.tokens()) == [(0, 1, True), (1, 1, False)]
    assert gate.queue.held == {}


class Wakes:
    """The waiting runs a gate wakes for tokens put back free, by target."""

    def __init__(self, gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: list[tuple[str, int]] = []

        async def wake(target: str, count: int) -> None:
            self.counts.append((target, count))

        monkeypatch.setattr(gate.gate, "_wake_for_released", wake)


async def test_a_stand_in_wakes_nobody_and_a_free_token_put_back_wakes_one_however_often(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each free token a scan held may have been the one a release woke a run for: one wake
    # for each such token, not one for each pass that held it, and none for a token kept.
    monkeypatch.setattr(slot_requests, "TAKE_BACK_PAUSE_SECONDS", (0.0, 0.0))
    gate = Gate(TokenQueue((1, 1, True), (2, 1, False)))
    wakes = Wakes(gate, monkeypatch)
    gate.running("a", 0)
    await gate.reconnect()
    assert wakes.counts == []  # token 2 stands in for token 0: nothing is free

    queue = TokenQueue((2, 1, False))
    queue.later, queue.dry_before_later = [(0, 1, True)], 4  # back after four passes
    gate = Gate(queue)
    wakes = Wakes(gate, monkeypatch)
    lease = gate.running("a", 0)
    await gate.reconnect()
    assert [t.number for t in lease.tokens] == [0]
    assert wakes.counts == [(TARGET, 1)]


async def test_a_stand_in_taken_for_a_run_stopped_meanwhile_is_given_back_and_woken_for(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run elsewhere releases token 2 (waking a waiting run) during the take-back's final
    # round, whose next pass takes it in the stead of token 0; the run is stopped at its
    # deadline meanwhile (its lease dropped, its tokens kept). Token 2 goes back free, and
    # a waiting run is woken for it: the one its release woke may have found it taken.
    monkeypatch.setattr(slot_requests, "TAKE_BACK_PAUSE_SECONDS", (0.0, 0.0))
    passes_before = slot_requests.TAKE_BACK_PASSES + 1  # the first round's, the final's first
    queue = TokenQueue((1, 1, True))
    queue.later, queue.dry_before_later = [(2, 1, False)], passes_before
    gate = Gate(queue)
    wakes = Wakes(gate, monkeypatch)
    lease = gate.running("a", 0)

    async def run_stopped() -> None:
        gate.gate._leases.discard(lease)

    queue.on_get = (2 * passes_before + 1, run_stopped)  # (two gets a pass until then)
    await gate.reconnect()
    assert sorted(gate.queue.tokens()) == [(1, 1, True), (2, 1, False)]
    assert gate.queue.held == {}
    assert wakes.counts == [(TARGET, 1)]
