"""Shared limits across workers on the real broker, set through the installed CLI.

Concurrency is measured as a subscriber sees it: from each run's `submitted`
event to its terminal event, across every worker.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import anyio.abc
import pytest

from mq_worker import pool_control, slots
from mq_worker.events import Event
from mq_worker.topology import limit_queue_name
from mq_worker.workers.process import ProcessWorker
from tests.helpers import (
    HOST,
    PORT,
    EventLog,
    VHost,
    ended_runs,
    probe,
    publish_raw,
    run_body,
    running_worker,
    started_runs,
    unique,
    until_ready,
    wait_until,
)
from tests.helpers.workers import HeldSetUp, reconnects
from tests.proxy import link_proxy
from tests.test_cancel import cancel_raw
from tests.test_cli import mq_worker
from tests.test_priority import declare_queues

pytestmark = pytest.mark.anyio


async def cli(*args: str) -> str:
    result = await mq_worker(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def intervals(events: list[Event], run_ids: set[str]) -> list[tuple[float, float]]:
    """(submitted, terminal) times of the runs in `run_ids` that started."""
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    for event in unique(events):
        if event.subject not in run_ids:
            continue
        if event.type == "mq_worker.run.submitted":
            start[event.subject] = event.time.timestamp()
        elif event.is_terminal:
            end[event.subject] = event.time.timestamp()
    return [(start[r], end.get(r, float("inf"))) for r in start]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                   key=lambda edge: (edge[0], edge[1]))  # an end before a start at the same time
    current = peak = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


async def limit_ls(url: str) -> dict[str, dict[str, Any]]:
    out = await cli("limit", "ls", "--json", "--url", url)
    return {row["target"]: row for row in map(json.loads, out.splitlines())}


async def test_a_pool_limit_holds_across_three_workers(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    assert "limit 5" in await cli("limit", "set", "pool:etl", "5", "--url", vhost.url)
    # All 40 queued before the workers start: 12 worker slots compete for 5 at once.
    await declare_queues(vhost.url, "etl", ["default"])
    bodies = [run_body(probe(tmp_path, sleep=0.3)) for _ in range(40)]
    for body in bodies:
        await publish_raw(vhost.url, body, routing_key="run.scheduled.etl.default")
    async with running_worker(vhost.url, pool="etl", limit=4), \
            running_worker(vhost.url, pool="etl", limit=4), \
            running_worker(vhost.url, pool="etl", limit=4):
        await events.wait_terminal([b["id"] for b in bodies], timeout=90)
        ids = {b["id"] for b in bodies}
        assert all(events.types(r)[-1] == "run.completed" for r in ids)
        peak = most_at_once(intervals(events.events, ids))
        assert 3 <= peak <= 5, peak
        assert len({e.data["worker"] for e in events.events
                    if e.type == "mq_worker.run.submitted"}) >= 2
        waited = [e for e in events.events if e.type == "mq_worker.run.pending"
                  and e.data.get("waiting_for") == "pool:etl"]
        assert waited, "40 runs for 5 slots: some must have waited"
        # None lost, none doubled, none held by a worker with no run (a worker keeps the
        # slot of its last run for a moment while the limit is far from reached: spares).
        await until_ready(vhost.url, {limit_queue_name("pool:etl"): 5}, timeout=10)
        usage = await limit_ls(vhost.url)
        assert usage["pool:etl"] == {"target": "pool:etl", "limit": 5, "in_use": 0, "waiting": 0}


async def test_a_key_limit_holds_back_only_the_runs_of_that_key_and_in_order_of_arrival(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    await cli("limit", "set", "key:deployment:d-1", "1", "--url", vhost.url)
    async with running_worker(vhost.url, limit=4), running_worker(vhost.url, limit=4):
        keyed = [run_body(probe(tmp_path, sleep=0.5), deployment={"id": "d-1"})
                 for _ in range(6)]
        free = [run_body(probe(tmp_path, sleep=0.1)) for _ in range(6)]
        for body in keyed:
            await publish_raw(vhost.url, body)
            await events.wait_for(lambda _, r=body["id"]: events.of(r))  # arrival order
        for body in free:
            await publish_raw(vhost.url, body)
        # The unlimited runs are not held back behind the waiting ones.
        await events.wait_terminal([b["id"] for b in free], timeout=20)
        assert not all(events.terminal(b["id"]) for b in keyed)
        await events.wait_terminal([b["id"] for b in keyed], timeout=30)
    ids = [b["id"] for b in keyed]
    assert most_at_once(intervals(events.events, set(ids))) == 1
    starts = {e.subject: e.time for e in unique(events.events)
              if e.type == "mq_worker.run.submitted"}
    assert sorted(ids, key=lambda r: starts[r]) == ids
    waiting = [e for e in events.events if e.data.get("waiting_for") == "key:deployment:d-1"]
    assert {e.subject for e in waiting} == set(ids[1:])


async def test_a_queue_limit_and_a_concurrency_key_limit_hold_with_unlimited_runs_mixed_in(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    await cli("limit", "set", "queue:etl/low", "2", "--url", vhost.url)
    await cli("limit", "set", "key:warehouse", "1", "--url", vhost.url)
    async with running_worker(vhost.url, pool="etl", queue=["high", "low"], limit=4), \
            running_worker(vhost.url, pool="etl", queue=["low", "high"], limit=4):
        low = [run_body(probe(tmp_path, sleep=0.4)) for _ in range(8)]
        warehouse = [run_body(probe(tmp_path, sleep=0.4), concurrency_key="warehouse")
                     for _ in range(4)]
        high = [run_body(probe(tmp_path, sleep=0.1)) for _ in range(8)]
        for body in low:
            await publish_raw(vhost.url, body, routing_key="run.scheduled.etl.low")
        for body in warehouse + high:
            await publish_raw(vhost.url, body, routing_key="run.scheduled.etl.high")
        await events.wait_terminal([b["id"] for b in low + warehouse + high], timeout=60)
    assert most_at_once(intervals(events.events, {b["id"] for b in low})) == 2
    assert most_at_once(intervals(events.events, {b["id"] for b in warehouse})) == 1
    assert most_at_once(intervals(events.events, {b["id"] for b in high})) >= 2
    assert all(events.types(b["id"])[-1] == "run.completed" for b in low + warehouse + high)


async def test_a_run_under_two_limits_holds_a_slot_of_each_and_both_limits_hold(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """Its two tokens are taken at once, on two channels: both limits hold, a run that
    finds one but not the other gives the one back, and every token comes back."""
    await cli("limit", "set", "key:tag:etl", "2", "--url", vhost.url)
    await cli("limit", "set", "key:db", "3", "--url", vhost.url)
    async with running_worker(vhost.url, limit=6), running_worker(vhost.url, limit=6):
        both = [run_body(probe(tmp_path, sleep=0.4), tags=["etl"], concurrency_key="db")
                for _ in range(8)]
        db_only = [run_body(probe(tmp_path, sleep=0.4), concurrency_key="db")
                   for _ in range(6)]
        for body in [run for pair in zip(both, db_only + [{}] * 2, strict=True)
                     for run in pair if run]:
            await publish_raw(vhost.url, body)
        ids = [b["id"] for b in both + db_only]
        await events.wait_terminal(ids, timeout=60)
        await until_ready(vhost.url, {limit_queue_name("key:tag:etl"): 2,
                                      limit_queue_name("key:db"): 3}, timeout=10)
    assert all(events.types(r)[-1] == "run.completed" for r in ids)
    assert most_at_once(intervals(events.events, {b["id"] for b in both})) == 2
    assert most_at_once(intervals(events.events, set(ids))) == 3
    assert any(e.data.get("waiting_for") for e in events.events)  # both were reached


async def test_limit_changes_take_effect_at_once_on_running_workers(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    await cli("limit", "set", "key:tag:nightly", "1", "--url", vhost.url)
    async with running_worker(vhost.url, limit=8):
        bodies = [run_body(probe(tmp_path, sleep=2), tags=["nightly"]) for _ in range(8)]
        for body in bodies:
            await publish_raw(vhost.url, body)
        ids = {b["id"] for b in bodies}
        await events.wait_for(lambda evs: len([e for e in evs if e.data.get("waiting_for")]) >= 7)
        usage = (await limit_ls(vhost.url))["key:tag:nightly"]
        assert usage["limit"] == 1 and usage["in_use"] == 1 and usage["waiting"] >= 4, usage
        raised_at = time.time()
        await cli("limit", "set", "key:tag:nightly", "3", "--url", vhost.url)
        await events.wait_for(lambda evs: len(
            [e for e in evs if e.type == "mq_worker.run.submitted"]) >= 4, timeout=10)
        assert "key:tag:nightly: no limit" in await cli(
            "limit", "rm", "key:tag:nightly", "--url", vhost.url)
        await events.wait_terminal(ids, timeout=30)
        assert "key:tag:nightly" not in await limit_ls(vhost.url)
    spans = intervals(events.events, ids)
    assert most_at_once([s for s in spans if s[1] <= raised_at]) <= 1
    assert most_at_once(spans) >= 3  # raised to 3, then removed: more ran at once


async def test_a_worker_killed_with_slots_gives_them_back_within_seconds(
    vhost: VHost, events: EventLog, tmp_path: Path, worker_processes: Any
) -> None:
    await cli("limit", "set", "key:deployment:d-9", "2", "--url", vhost.url)
    doomed = worker_processes(vhost.url, "--limit", "4")
    await events.wait_for(lambda evs: any(e.type == "mq_worker.worker.started" for e in evs),
                          timeout=60)
    first = [run_body(probe(tmp_path, sleep=60), deployment={"id": "d-9"}) for _ in range(2)]
    for body in first:
        await publish_raw(vhost.url, body)
    await events.wait_for(lambda _: all("run.submitted" in events.types(b["id"]) for b in first))
    queue = limit_queue_name("key:deployment:d-9")
    await until_ready(vhost.url, {queue: 0}, timeout=10)  # both slots taken
    async with running_worker(vhost.url, limit=4):
        later = [run_body(probe(tmp_path, sleep=0.2), deployment={"id": "d-9"})
                 for _ in range(4)]
        for body in later:
            await publish_raw(vhost.url, body)
        await events.wait_for(lambda evs: len([e for e in evs if e.data.get("waiting_for")]) >= 4)
        doomed.signal(signal.SIGKILL)
        killed_at = time.time()
        await events.wait_terminal([b["id"] for b in later], timeout=30)
        starts = sorted(e.time.timestamp() for e in events.events
                        if e.type == "mq_worker.run.submitted" and e.subject in
                        {b["id"] for b in later})
        assert starts[0] - killed_at < 5, starts[0] - killed_at
        assert most_at_once(intervals(events.events, {b["id"] for b in later})) <= 2
        await until_ready(vhost.url, {queue: 2}, timeout=10)


@pytest.mark.slow
async def test_a_worker_that_reconnects_takes_its_running_runs_slots_again(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    await cli("limit", "set", "key:db", "1", "--url", vhost.url)
    queue = limit_queue_name("key:db")
    async with running_worker(vhost.url, limit=4, name="flaky-link") as worker:
        running = run_body(probe(tmp_path, sleep=20), concurrency_key="db")
        await publish_raw(vhost.url, running)
        await events.wait_for(lambda _: "run.submitted" in events.types(running["id"]))
        queued = run_body(probe(tmp_path), concurrency_key="db")
        await publish_raw(vhost.url, queued)
        await events.wait_for(lambda _: any(e.data.get("waiting_for") == "key:db"
                                            for e in events.of(queued["id"])))
        assert vhost.close_connections("flaky-link") == 1
        await wait_until(lambda: reconnects(worker) == 1 and worker.connected, timeout=30)
        # The slot is held again by the run still running, not free for the waiting one.
        await until_ready(vhost.url, {queue: 0}, timeout=10)
        await events.wait_terminal([running["id"], queued["id"]], timeout=40)
        await until_ready(vhost.url, {queue: 1}, timeout=10)
    assert most_at_once(intervals(events.events, {running["id"], queued["id"]})) == 1


async def test_shrinking_a_limit_lets_running_runs_finish_and_then_holds_the_new_limit(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    await cli("limit", "set", "key:report", "3", "--url", vhost.url)
    async with running_worker(vhost.url, limit=8):
        bodies = [run_body(probe(tmp_path, sleep=3), concurrency_key="report") for _ in range(6)]
        for body in bodies:
            await publish_raw(vhost.url, body)
        ids = {b["id"] for b in bodies}
        await events.wait_for(lambda evs: len(
            {e.subject for e in evs if e.type == "mq_worker.run.submitted"}) >= 3)
        await cli("limit", "set", "key:report", "1", "--url", vhost.url)
        shrunk_at = time.time()
        assert (await limit_ls(vhost.url))["key:report"]["limit"] == 1
        await events.wait_terminal(ids, timeout=60)
        await until_ready(vhost.url, {limit_queue_name("key:report"): 1}, timeout=15)
    spans = intervals(events.events, ids)
    assert all(events.types(r)[-1] == "run.completed" for r in ids)
    # Runs holding the removed slots finish; the runs started under the new limit share
    # its one slot, and the removed slots were destroyed, not given back.
    assert most_at_once([s for s in spans if s[0] > shrunk_at]) == 1, spans
    assert most_at_once(spans) <= 3


async def test_waiting_runs_keep_their_order_of_arrival_when_the_limit_shrinks(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """A run that ends holding a slot the shrink removed destroys it: that must not wake
    a waiting run, which would find no slot and wait again behind the others."""
    await cli("limit", "set", "key:report", "2", "--url", vhost.url)
    async with running_worker(vhost.url, limit=8):
        holding = [run_body(probe(tmp_path, sleep=s), concurrency_key="report")
                   for s in (1.5, 3)]
        for body in holding:
            await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: all("run.submitted" in events.types(b["id"])
                                            for b in holding))
        await cli("limit", "set", "key:report", "1", "--url", vhost.url)
        waiting = [run_body(probe(tmp_path, sleep=0.5), concurrency_key="report")
                   for _ in range(5)]
        for body in waiting:
            await publish_raw(vhost.url, body)
            await events.wait_for(lambda _, r=body["id"]: events.of(r))  # arrival order
        await events.wait_terminal([b["id"] for b in holding + waiting], timeout=60)
    ids = [b["id"] for b in waiting]
    assert all(events.types(r)[-1] == "run.completed" for r in ids)
    starts = {e.subject: e.time for e in unique(events.events)
              if e.type == "mq_worker.run.submitted"}
    assert sorted(ids, key=lambda r: starts[r]) == ids
    waits = {r: len([e for e in unique(events.of(r)) if e.data.get("waiting_for")])
             for r in ids}
    assert max(waits.values()) == 1, waits  # (the first may find a slot free and not wait)
    assert most_at_once(intervals(events.events, set(ids))) == 1


async def test_a_worker_cut_off_from_the_broker_does_not_let_others_exceed_a_key_limit(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its runs go on while the broker gives their slots back; other workers, with runs
    waiting and short runs ending all the time, must not start more than the limit."""
    # The 1 s a worker has to take its slots back, and the 1 s the others leave them,
    # made 5 s and 6 s: on a loaded machine a reconnect and its reclaim
    # can take over a second, and the runs would then rightly be stopped as slot-lost.
    monkeypatch.setattr(slots, "CUT_OFF_SECONDS", 5.0)
    monkeypatch.setattr(pool_control, "RETURNED_SLOT_GRACE_SECONDS", 6.0)
    await cli("limit", "set", "key:db", "3", "--url", vhost.url)
    async with running_worker(vhost.url, limit=4, name="cut-link") as cut:
        long = [run_body(probe(tmp_path, sleep=12), concurrency_key="db") for _ in range(2)]
        for body in long:
            await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: all("run.submitted" in events.types(b["id"])
                                            for b in long))
        async with running_worker(vhost.url, limit=4, name="steady"):
            short = [run_body(probe(tmp_path, sleep=0.2), concurrency_key="db")
                     for _ in range(30)]
            for body in short:
                await publish_raw(vhost.url, body)
            ids = [b["id"] for b in long + short]
            await events.wait_for(lambda evs: len(
                [e for e in evs if e.data.get("waiting_for") == "key:db"]) >= 5)
            for _ in range(3):
                ended = len([r for r in ids if events.terminal(r)])
                closes = reconnects(cut)
                assert vhost.close_connections("cut-link") == 1
                await wait_until(lambda c=closes: reconnects(cut) > c and cut.connected,
                                 timeout=30)
                await events.wait_for(
                    lambda _, before=ended: len([r for r in ids if events.terminal(r)])
                    >= before + 2, timeout=30)
            await events.wait_terminal(ids, timeout=90)
    assert most_at_once(intervals(events.events, set(ids))) <= 3
    # The runs that lost their slots with the connection took them back and went on, or,
    # where a run of the other worker took such a slot first (it holds it unused until
    # the cut-off run has stopped), were stopped for it: a worker takes back only the
    # tokens it held (docs/pools.md, "Only its own tokens"). Never anything else.
    for body in long:
        terminal = events.terminal(body["id"])
        assert [e.type for e in terminal] in (["mq_worker.run.completed"],
                                              ["mq_worker.run.crashed"]), terminal
        if terminal[0].type == "mq_worker.run.crashed":
            assert terminal[0].data["reason"] == "slot-lost", terminal[0].data
    # None lost. (A run moved between queues as the connection broke can be delivered
    # twice; it then completes twice, within the limit, as counted above.)
    assert all("run.completed" in events.types(b["id"]) for b in short), [
        events.types(b["id"]) for b in short if "run.completed" not in events.types(b["id"])]


async def test_a_fresh_run_elsewhere_waits_until_the_run_of_a_cut_off_worker_has_stopped(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """No run waits, and a worker untouched by the loss has a fresh run: the slot the
    broker gave back when the holder's connection closed is not one given back by a
    run that ended, so the fresh run starts only once the cut-off worker's run, which
    could not take its slot back in time, has stopped (`slot-lost`): the two processes
    never run at once."""
    await cli("limit", "set", "key:db", "1", "--url", vhost.url)
    queue = limit_queue_name("key:db")
    stopped_at = tmp_path / "held.term"
    async with link_proxy(HOST, PORT) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        async with running_worker(url, name="cut") as cut:
            held = run_body(probe(tmp_path, sleep=60, extra=f"--term-marker {stopped_at}"),
                            concurrency_key="db")
            await publish_raw(vhost.url, held)
            await wait_until(lambda: held["id"] in started_runs(tmp_path), timeout=15)
            # Its start is acknowledged with its submitted event: cut before that, the
            # broker would give its message back and another worker would take it.
            await events.wait_for(lambda _: "run.submitted" in events.types(held["id"]))
            async with running_worker(vhost.url, name="peer"):
                proxy.cut()
                await wait_until(lambda: not cut.connected, timeout=10)
                fresh = run_body(probe(tmp_path, sleep=0.5), concurrency_key="db")
                await publish_raw(vhost.url, fresh)
                await events.wait_for(lambda _: "run.submitted" in events.types(fresh["id"]),
                                      timeout=20)
                await wait_until(lambda: fresh["id"] in started_runs(tmp_path), timeout=15)
                await proxy.restore()
                await events.wait_terminal([held["id"], fresh["id"]], timeout=30)
                await until_ready(vhost.url, {queue: 1}, timeout=15)
    ending = events.terminal(held["id"])[-1]
    assert (ending.type, ending.data["reason"]) == ("mq_worker.run.crashed", "slot-lost")
    assert "key:db" in ending.data["message"]
    assert events.types(fresh["id"])[-1] == "run.completed"
    fresh_started = started_runs(tmp_path)[fresh["id"]]["t"]
    held_stopped = float(stopped_at.read_text())
    assert fresh_started > held_stopped, (
        f"the fresh run started {held_stopped - fresh_started:.2f} s before the run "
        "holding the slot was stopped")


async def test_a_worker_cut_off_longer_than_the_grace_stops_its_limited_runs_first(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """A run waits; its slot's holder is cut off for longer than the 2 s the other
    workers leave a returned slot alone. The waiting run then starts elsewhere: the cut-off
    worker must have stopped its run by then, not when it is back."""
    await cli("limit", "set", "key:db", "1", "--url", vhost.url)
    async with link_proxy(HOST, PORT) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        # Pools of their own: the waiting run is the peer's, whose check hands it on.
        async with running_worker(url, name="cut", pool="a") as cut:
            held = run_body(probe(tmp_path, sleep=60), concurrency_key="db")
            await publish_raw(vhost.url, held, routing_key="run.scheduled.a.default")
            await events.wait_for(lambda _: "run.submitted" in events.types(held["id"]))
            async with running_worker(vhost.url, name="peer", pool="b"):
                queued = run_body(probe(tmp_path, sleep=0.5), concurrency_key="db")
                await publish_raw(vhost.url, queued, routing_key="run.scheduled.b.default")
                await events.wait_for(lambda _: any(e.data.get("waiting_for") == "key:db"
                                                    for e in events.of(queued["id"])))
                proxy.cut()
                await wait_until(lambda: not cut.connected, timeout=10)
                # Handed on by the peer's check once the slot has stayed free for 2 s.
                await events.wait_for(lambda _: "run.submitted" in events.types(queued["id"]),
                                      timeout=20)
                await proxy.restore()
                await events.wait_terminal([held["id"], queued["id"]], timeout=30)
    assert most_at_once(intervals(events.events, {held["id"], queued["id"]})) == 1
    ending = events.terminal(held["id"])[-1]
    assert (ending.type, ending.data["reason"]) == ("mq_worker.run.crashed", "slot-lost")
    assert events.types(queued["id"])[-1] == "run.completed"


async def test_a_worker_back_from_a_lost_connection_leaves_the_slots_of_others_cut_off_with_it(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node loss cuts several workers off at once (those on the node, and those whose
    `basic.get` met its loss). The first back must not take, for a fresh run, the slot of
    one still reconnecting, even with no run waiting: that worker's run would be stopped
    only after the fresh run had started (in the cluster test, 4 runs of a limit of 3)."""
    # Longer than this test needs to bring the cut-off worker back, on a loaded machine.
    monkeypatch.setattr(slots, "CUT_OFF_SECONDS", 5.0)
    monkeypatch.setattr(pool_control, "RETURNED_SLOT_GRACE_SECONDS", 5.0)
    await cli("limit", "set", "key:db", "1", "--url", vhost.url)
    async with link_proxy(HOST, PORT) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        async with running_worker(url, name="cut") as cut:
            held = run_body(probe(tmp_path, sleep=4), concurrency_key="db")
            await publish_raw(vhost.url, held)
            await events.wait_for(lambda _: "run.submitted" in events.types(held["id"]))
            async with running_worker(vhost.url, name="back-first") as back_first:
                proxy.cut()
                assert vhost.close_connections("back-first") == 1
                await wait_until(lambda: not cut.connected, timeout=10)
                reconnects = back_first.metrics.reconnects
                await wait_until(lambda: back_first.connected
                                 and reconnects._value.get() >= 1)  # type: ignore[attr-defined]
                fresh = run_body(probe(tmp_path, sleep=0.5), concurrency_key="db")
                await publish_raw(vhost.url, fresh)
                await events.wait_for(lambda _: len(events.of(fresh["id"])) >= 1)
                await proxy.restore()
                await events.wait_terminal([held["id"], fresh["id"]], timeout=60)
    assert events.types(held["id"])[-1] == "run.completed", events.terminal(held["id"])
    assert "run.completed" in events.types(fresh["id"])
    assert most_at_once(intervals(events.events, {held["id"], fresh["id"]})) == 1


async def test_a_run_cancelled_while_it_holds_a_slot_lost_with_another_worker_never_starts(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run holds a slot that came back with a lost connection unused for a while before
    it starts; a cancel that arrives meanwhile ends it cancelled, before its process starts."""
    monkeypatch.setattr(slots, "RETURNED_TOKEN_HOLD_MARGIN_SECONDS", 4.0)  # a 5 s hold
    await cli("limit", "set", "key:db", "1", "--url", vhost.url)
    queue = limit_queue_name("key:db")
    async with link_proxy(HOST, PORT) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        async with running_worker(url, name="cut") as cut:
            held = run_body(probe(tmp_path, sleep=60), concurrency_key="db")
            await publish_raw(vhost.url, held)
            await events.wait_for(lambda _: "run.submitted" in events.types(held["id"]))
            async with running_worker(vhost.url, name="peer"):
                proxy.cut()
                await wait_until(lambda: not cut.connected, timeout=10)
                await until_ready(vhost.url, {queue: 1}, timeout=10)
                fresh = run_body(probe(tmp_path), concurrency_key="db")
                await publish_raw(vhost.url, fresh)
                await until_ready(vhost.url, {queue: 0}, timeout=10)  # its one token taken
                await cancel_raw(vhost.url, fresh["id"], reason="changed my mind")
                await events.wait_terminal([fresh["id"]], timeout=20)
                await proxy.restore()
                await events.wait_terminal([held["id"]], timeout=30)
                await until_ready(vhost.url, {queue: 1}, timeout=15)
    assert events.types(fresh["id"])[-1] == "run.cancelled", events.of(fresh["id"])
    assert fresh["id"] not in started_runs(tmp_path)


class SetUpWorker(HeldSetUp, ProcessWorker):
    """A process worker that sets each run up before its process starts."""


async def test_a_run_whose_slot_is_lost_while_it_is_being_set_up_is_not_started_without_it(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """Its token went back to the broker with the connection while the run was still
    being set up, and another run took it: its process must not start once the set-up
    is done (the limit would be exceeded for as long as it ran). Its message went back
    too: it runs once delivered again, with a slot."""
    await cli("limit", "set", "key:db", "1", "--url", vhost.url)
    async with link_proxy(HOST, PORT) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        # Pools of their own: the run's message, back at the broker, is this worker's.
        async with running_worker(url, SetUpWorker, name="cut", pool="a") as cut:
            assert isinstance(cut, SetUpWorker)
            held = run_body(probe(tmp_path, sleep=0.2), concurrency_key="db")
            await publish_raw(vhost.url, held, routing_key="run.scheduled.a.default")
            with anyio.fail_after(20):
                await cut.setting_up.wait()  # it holds the slot's token
            async with running_worker(vhost.url, name="peer", pool="b"):
                proxy.cut()
                await wait_until(lambda: not cut.connected, timeout=10)
                fresh = run_body(probe(tmp_path, sleep=2), concurrency_key="db")
                await publish_raw(vhost.url, fresh, routing_key="run.scheduled.b.default")
                await events.wait_for(lambda _: "run.submitted" in events.types(fresh["id"]))
                # Until its worker gives its slot up (CUT_OFF_SECONDS after the cut).
                run_id = UUID(held["id"])
                await wait_until(lambda: run_id not in cut._book.active
                                 or cut._book.active[run_id].slot_lost is not None, timeout=10)
                cut.set_up.set()
                await proxy.restore()
                await events.wait_terminal([held["id"], fresh["id"]], timeout=30)
                await until_ready(vhost.url, {limit_queue_name("key:db"): 1}, timeout=15)
    assert most_at_once(intervals(events.events, {held["id"], fresh["id"]})) == 1
    assert [events.types(r)[-1] for r in (held["id"], fresh["id"])] == ["run.completed"] * 2
    assert [e.type for e in unique(events.of(held["id"]))].count("mq_worker.run.submitted") == 1
    assert len(ended_runs(tmp_path)) == 2
