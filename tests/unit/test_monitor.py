"""The pool monitor's table of peers without a broker: who is reported lost, when, and once.

The broker's part (the election's token, the heartbeat stream up to the reporter's marker)
is stood in for by `_elected`: the table is what decides which workers are lost.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands as spec

from mq_worker.events import EventType, HeartbeatRun
from mq_worker.monitor import MIN_CHECK_SECONDS, PoolMonitor
from mq_worker.peer_events import (
    WORKER_EVENT_TYPES,
    InvalidWorkerEvent,
    PeerRecord,
    WorkerEvent,
    WorkerReport,
    parse_worker_event,
)
from mq_worker.topology import MARKER_HEADER

POOL = "etl"


def _event(kind: str, worker: str, *, pool: str = POOL, heartbeat_seconds: float = 10.0,
           runs: tuple[uuid.UUID, ...] = (), age: float = 0.0) -> WorkerEvent:
    report = WorkerReport(
        worker=worker, pool=pool, heartbeat_seconds=heartbeat_seconds,
        runs=[HeartbeatRun(id=run, state="running") for run in runs],
    )
    return WorkerEvent(str(uuid.uuid4()), kind, datetime.now(UTC) - timedelta(seconds=age),
                       report)


def _monitor(lost: list[PeerRecord], *, elected: bool = True) -> PoolMonitor:
    monitor = PoolMonitor(pool=POOL, me="me", missed=3, on_lost=lost.append)
    if elected:
        _elected(monitor)
    return monitor


def _elected(monitor: PoolMonitor) -> None:
    """As if this worker won its pool's election and read the stream up to its marker."""
    monitor._election.won.set()
    monitor._finish_replay()


def test_a_peer_silent_for_its_missed_heartbeats_is_reported_once_with_its_runs() -> None:
    lost: list[PeerRecord] = []
    monitor = _monitor(lost)
    run = uuid.uuid4()
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "busy", runs=(run,)), now=100.0)

    assert monitor.check(now=129.9) == []
    reported = monitor.check(now=130.1)

    assert [r.name for r in reported] == ["busy"] and lost == reported
    assert reported[0].lost and [r["id"] for r in reported[0].runs] == [str(run)]
    assert monitor.check(now=200.0) == [] and len(lost) == 1


def test_each_peer_is_judged_by_its_own_heartbeat_interval() -> None:
    lost: list[PeerRecord] = []
    monitor = _monitor(lost)
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "fast", heartbeat_seconds=1), now=100.0)
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "slow", heartbeat_seconds=30), now=100.0)

    assert [r.name for r in monitor.check(now=104.0)] == ["fast"]
    assert "slow" in monitor.peers


def test_a_peer_that_keeps_beating_is_never_lost() -> None:
    lost: list[PeerRecord] = []
    monitor = _monitor(lost)
    for now in range(100, 200, 10):
        monitor.observe(_event(EventType.WORKER_HEARTBEAT, "steady"), now=float(now))
        assert monitor.check(now=now + 5.0) == []
    assert lost == []


def test_a_peer_that_stopped_or_was_reported_by_another_worker_is_not_reported() -> None:
    lost: list[PeerRecord] = []
    monitor = _monitor(lost)
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "stopping"), now=100.0)
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "reported"), now=100.0)

    monitor.observe(_event(EventType.WORKER_STOPPED, "stopping"), now=101.0)
    monitor.observe(_event(EventType.WORKER_LOST, "reported"), now=101.0)

    assert monitor.check(now=500.0) == [] and lost == []


def test_only_the_elected_reporter_reports_and_never_itself() -> None:
    lost: list[PeerRecord] = []
    monitor = _monitor(lost, elected=False)
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "me"), now=100.0)
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "peer"), now=100.0)

    assert monitor.check(now=500.0) == []
    _elected(monitor)

    assert [r.name for r in monitor.check(now=500.0)] == ["peer"]
    assert [r.name for r in lost] == ["peer"]


def test_events_of_another_pool_do_not_enter_the_table() -> None:
    lost: list[PeerRecord] = []
    monitor = _monitor(lost)

    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "elsewhere", pool="other"), now=100.0)

    assert monitor.peers == {} and monitor.check(now=500.0) == []


def test_a_peer_restarted_while_holding_runs_has_those_runs_reported_at_once() -> None:
    lost: list[PeerRecord] = []
    monitor = _monitor(lost)
    run = uuid.uuid4()
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "flaky", runs=(run,)), now=100.0)

    monitor.observe(_event(EventType.WORKER_STARTED, "flaky"), now=101.0)

    assert [[r["id"] for r in record.runs] for record in lost] == [[str(run)]]
    assert monitor.peers["flaky"].restarted_from is lost[0]
    assert monitor.check(now=102.0) == []  # the restarted worker itself is alive


def test_a_peer_restarted_without_runs_is_not_reported() -> None:
    lost: list[PeerRecord] = []
    monitor = _monitor(lost)
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "idle"), now=100.0)

    monitor.observe(_event(EventType.WORKER_STARTED, "idle"), now=101.0)

    assert lost == [] and monitor.peers["idle"].restarted_from is None


def test_checks_follow_the_fastest_peer_but_never_spin() -> None:
    monitor = _monitor([])
    assert monitor.check_every(30.0) == 15.0
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "fast", heartbeat_seconds=1), now=100.0)
    assert monitor.check_every(30.0) == 0.5
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "frantic", heartbeat_seconds=0.01),
                    now=100.0)
    assert monitor.check_every(30.0) == MIN_CHECK_SECONDS


def test_a_copy_of_a_peers_started_event_is_not_taken_for_a_restart() -> None:
    lost: list[PeerRecord] = []
    monitor = _monitor(lost)
    started = _event(EventType.WORKER_STARTED, "busy")
    monitor.observe(started, now=100.0)
    beat = _event(EventType.WORKER_HEARTBEAT, "busy", runs=(uuid.uuid4(),))
    beat = WorkerEvent(beat.id, beat.type, beat.time,
                       beat.report.model_copy(update={"follows": started.id}))
    monitor.observe(beat, now=101.0)

    monitor.observe(started, now=102.0)  # published again (a lost confirm) or replayed
    assert lost == [] and monitor.peers["busy"].event is beat

    monitor.observe(_event(EventType.WORKER_STARTED, "busy"), now=103.0)  # a real restart
    assert [r.name for r in lost] == ["busy"]


_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
            | st.text(st.characters(exclude_categories=()), max_size=20))
_values = st.recursive(_scalars, lambda children: st.lists(children, max_size=3)
                       | st.dictionaries(st.text(max_size=10), children, max_size=3),
                       max_leaves=8)
_worker_data = st.fixed_dictionaries({}, optional={
    "worker": st.sampled_from(["w", "me", ""]) | _values,
    "pool": st.just(POOL) | _values,
    "heartbeat_seconds": st.sampled_from([1, 0.001, 86_400, 86_401, -1, 0, 1e308]) | _values,
    "runs": st.lists(st.fixed_dictionaries({"id": st.uuids().map(str) | _values,
                                            "state": st.just("running") | _values}),
                     max_size=2) | _values,
    "in_flight": st.lists(st.uuids().map(str) | _values, max_size=2) | _values,
    "follows": _values,
})
_worker_events = st.fixed_dictionaries({
    "specversion": st.just("1.0"), "id": st.text(max_size=8), "source": st.just("/x"),
    "type": st.sampled_from(sorted(WORKER_EVENT_TYPES)) | _values,
    "time": st.sampled_from(["2026-11-29T00:00:00Z", "0001-01-01T00:00:00+23:59",
                             "9999-12-31T23:59:59-23:59", "not a time"]) | _values,
    "data": _worker_data | _values,
})


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_worker_events.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=20),
                max_size=6))
def test_any_worker_events_are_refused_cleanly_or_watched_without_error(
    bodies: list[bytes]
) -> None:
    lost: list[PeerRecord] = []
    replaying = _monitor(lost, elected=False)
    for body in bodies:
        replaying._replay.keep(body, now=time.time())
    _elected(replaying)
    live = _monitor(lost)
    for body in bodies:
        try:
            event = parse_worker_event(body)
        except InvalidWorkerEvent:
            continue
        live.observe(event, now=100.0)
    for monitor in (replaying, live):
        monitor.check_every(30.0)
        monitor.check(now=1e12)
    assert all(record.name != "me" for record in lost)


def _body(kind: str, worker: str, *, age: float, runs: tuple[uuid.UUID, ...] = ()) -> bytes:
    when = datetime.now(UTC) - timedelta(seconds=age)
    return json.dumps({
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "/x", "type": kind,
        "time": when.isoformat(), "subject": worker,
        "data": {"worker": worker, "pool": POOL, "heartbeat_seconds": 1,
                 "runs": [{"id": str(r), "state": "running"} for r in runs]},
    }).encode()


def test_a_new_reporter_skips_old_copies_it_replays_from_the_stream() -> None:
    """A copy of an hour-old heartbeat, published again a moment ago, is in the stream
    too: the reporter that refused it live refuses it again when replaying it."""
    lost: list[PeerRecord] = []
    monitor = _monitor(lost, elected=False)
    monitor._replay.start(time.time() - 60.0)  # as _take_over starts it
    monitor._replay.keep(_body(EventType.WORKER_HEARTBEAT, "alive", age=5), now=time.time())
    monitor._replay.keep(_body(EventType.WORKER_HEARTBEAT, "ghost", age=3600,
                               runs=(uuid.uuid4(),)), now=time.time())
    _elected(monitor)

    assert sorted(monitor.peers) == ["alive"]
    assert [r.name for r in monitor.check(now=time.monotonic() + 10)] == ["alive"]


def test_a_replayed_event_from_the_future_makes_no_other_look_old() -> None:
    monitor = _monitor([], elected=False)
    monitor._replay.start(time.time() - 60.0)
    monitor._replay.keep(_body(EventType.WORKER_HEARTBEAT, "ahead", age=-3600), now=time.time())
    monitor._replay.keep(_body(EventType.WORKER_HEARTBEAT, "alive", age=5), now=time.time())
    _elected(monitor)
    assert sorted(monitor.peers) == ["ahead", "alive"]


def test_a_flood_of_forged_names_does_not_grow_the_table_past_its_cap() -> None:
    lost: list[PeerRecord] = []
    monitor = PoolMonitor(pool=POOL, me="me", missed=3, on_lost=lost.append, max_peers=100)
    _elected(monitor)
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "real"), now=100.0)
    for i in range(10_000):
        monitor.observe(_event(EventType.WORKER_HEARTBEAT, f"forged-{i}",
                               heartbeat_seconds=3600.0), now=100.0)

    assert len(monitor.peers) == 100
    assert monitor.refused_peers == 10_000 - 99
    # Peers already known are still followed, and found lost when they fall silent.
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "real"), now=110.0)
    assert [p.name for p in monitor.check(now=141.0)] == ["real"]


def test_a_heartbeat_interval_above_any_workers_own_is_refused() -> None:
    event = _event(EventType.WORKER_HEARTBEAT, "slow", heartbeat_seconds=10.0)
    body = json.dumps({
        "specversion": "1.0", "id": event.id, "source": "/x", "type": event.type,
        "time": event.time.isoformat(),
        "data": {"worker": "slow", "pool": POOL, "heartbeat_seconds": 3601},
    }).encode()
    try:
        parse_worker_event(body)
    except InvalidWorkerEvent as exc:
        assert "heartbeat_seconds" in exc.reason
    else:
        raise AssertionError("a heartbeat interval above 3600 s was accepted")


def test_a_copy_of_an_earlier_heartbeat_published_again_does_not_keep_a_silent_peer_alive(
) -> None:
    lost: list[PeerRecord] = []
    monitor = _monitor(lost)
    earlier = _event(EventType.WORKER_HEARTBEAT, "gone", age=5.0)
    monitor.observe(_event(EventType.WORKER_HEARTBEAT, "gone"), now=100.0)
    monitor.observe(earlier, now=125.0)  # replayed by someone who kept a copy

    assert [p.name for p in monitor.check(now=130.1)] == ["gone"]


def test_a_flood_in_the_replayed_stream_is_held_within_the_cap() -> None:
    lost: list[PeerRecord] = []
    monitor = PoolMonitor(pool=POOL, me="me", missed=3, on_lost=lost.append, max_peers=50)
    monitor._election.won.set()  # elected, still replaying
    for i in range(5_000):
        for kind in ("started", "heartbeat"):  # alternating: nothing to fold
            monitor._replay.keep(json.dumps({
                "type": f"mq_worker.worker.{kind}", "id": str(uuid.uuid4()),
                "time": datetime.now(UTC).isoformat(),
                "data": {"worker": f"forged-{i % 60}", "pool": POOL}}).encode(), now=time.time())

    assert len(monitor._replay.by_worker) <= 50
    assert sum(len(events) for events in monitor._replay.by_worker.values()) <= 50 * 64
    monitor._finish_replay()
    assert len(monitor.peers) <= 50


class _StreamMessage:
    """What the reporter reads off its heartbeat stream: a body and its headers."""

    def __init__(self, headers: dict[str, object], body: bytes = b"") -> None:
        self.body = body
        self.delivery = spec.Basic.Deliver(delivery_tag=1)
        self.header = type("Header", (), {"properties": spec.Basic.Properties(headers=headers)})()
        self.acked: list[int] = []
        self.channel = self

    async def basic_ack(self, delivery_tag: int, wait: bool = True) -> None:
        self.acked.append(delivery_tag)


@pytest.mark.anyio
async def test_a_marker_header_that_is_not_utf8_is_some_other_marker() -> None:
    monitor = _monitor([], elected=False)
    monitor._election.won.set()
    monitor._marker = "ours"
    odd = _StreamMessage({MARKER_HEADER: b"\xff\xfe"})
    await monitor._on_stream_message(odd)  # type: ignore[arg-type]
    assert odd.acked == [1]
    assert monitor.replaying, "a stranger's marker ended the replay"
    await monitor._on_stream_message(_StreamMessage({MARKER_HEADER: b"ours"}))  # type: ignore[arg-type]
    assert not monitor.replaying
