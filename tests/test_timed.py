"""Timed delivery: runs published ahead of their start time start on time, parked in the broker."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from mq_worker.delay import ladder_routing_key, park_seconds
from mq_worker.messages import RunMessage
from mq_worker.publisher import Publisher
from mq_worker.topology import DEAD_QUEUE, DELAY_LEVELS, MAX_PARK_SECONDS, delay_name
from tests.helpers import (
    EventLog,
    VHost,
    probe,
    publish_raw,
    ready_counts,
    run_body,
    running_worker,
    started_runs,
    wait_until,
)

pytestmark = pytest.mark.anyio


def at(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def test_ladder_routing_key_spells_the_delay_in_binary() -> None:
    key = ladder_routing_key(5, "run.scheduled.p.q")
    bits = key.split(".")[:DELAY_LEVELS]
    assert "".join(bits) == format(5, f"0{DELAY_LEVELS}b")
    assert key.endswith(".run.scheduled.p.q")
    assert ladder_routing_key(10**12, "x").split(".")[:DELAY_LEVELS] == ["1"] * DELAY_LEVELS
    assert int("".join(ladder_routing_key(MAX_PARK_SECONDS, "x").split(".")[:DELAY_LEVELS]),
               2) == MAX_PARK_SECONDS
    # Back 1-2 s early (then held): never late on account of the ladder's transit.
    assert park_seconds(100.2, prefetch_seconds=10) == 99
    assert park_seconds(100.0, prefetch_seconds=10) == 99
    assert park_seconds(100.9, prefetch_seconds=10) == 99
    # A window of 1.5 s: back 0.5-1.5 s early, still inside the window.
    assert park_seconds(100.2, prefetch_seconds=1.5) == 99
    assert park_seconds(100.6, prefetch_seconds=1.5) == 100
    # No window: back up to a second late rather than early.
    assert park_seconds(100.2, prefetch_seconds=0) == 101
    for until_due in (3.0, 3.5, 61.99, 3600.0):
        for prefetch in (1.0, 2.0, 10.0):
            early = until_due - park_seconds(until_due, prefetch)
            assert 0 <= early < prefetch, (until_due, prefetch)


async def test_ten_runs_across_a_worker_handover_start_on_time(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    first = worker_processes(vhost.url, "--limit", "10")
    await events.wait_for(lambda evs: any(e.subject == first.name for e in evs), timeout=30)
    base, clock = time.time(), anyio.current_time()
    dues = {}
    for i in range(10):
        due = base + 3 + i * 11 / 9  # 3 s to 14 s ahead
        body = run_body(probe(tmp_path), scheduled_start_time=at(due))
        dues[body["id"]] = due
        await publish_raw(vhost.url, body)

    await anyio.sleep_until(clock + 6.5)  # the scenario's clock, not a synchronization
    stopped_at = time.time()
    first.signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(first.wait) == 0
    await anyio.sleep_until(clock + 8.5)
    second = worker_processes(vhost.url, "--limit", "10")
    ready = await events.wait_for(lambda evs: [
        e for e in evs if e.type == "mq_worker.worker.started" and e.subject == second.name],
        timeout=30)
    ready_at = ready[0].time.timestamp()
    await events.wait_terminal(list(dues), timeout=30)

    starts = {run_id: record["t"] for run_id, record in started_runs(tmp_path).items()}
    assert set(starts) == set(dues)
    for run_id, due in dues.items():
        assert starts[run_id] >= due, f"started {due - starts[run_id]:.3f} s early"
        if due < stopped_at or due > ready_at:
            assert starts[run_id] - due < 1.0, f"{starts[run_id] - due:.3f} s late"
    lateness = sorted(starts[r] - d for r, d in dues.items() if d < stopped_at or d > ready_at)
    print(f"\nlateness of runs due while a worker was up: {[round(x, 3) for x in lateness]}")


async def test_a_run_due_in_an_hour_is_parked_not_held(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path), scheduled_start_time=at(time.time() + 3600))
    async with running_worker(vhost.url) as worker:
        await publish_raw(vhost.url, body)
        await wait_until(lambda: worker.metrics.parked.labels("default", "default")._value.get())
        assert worker.in_flight == []
    # The worker is gone: a message it had not acknowledged would be back in its queue.
    ladder = [delay_name(level) for level in range(DELAY_LEVELS)]
    counts = await ready_counts(vhost.url, ["mq_worker.default.default", DEAD_QUEUE, *ladder])
    assert counts["mq_worker.default.default"] == 0 and counts[DEAD_QUEUE] == 0
    # 3600 s less the second it comes back early: levels 11, 10, 9, 4, 3, 2, 1, 0 hold it.
    assert {q: n for q, n in counts.items() if n} == {delay_name(11): 1}
    assert events.of(body["id"]) == []


async def test_parked_run_cancelled_before_due_never_starts(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    async with Publisher(vhost.url) as publisher:  # declares the delay ladder beforehand
        await publisher.submit(RunMessage.model_validate(
            run_body("true", scheduled_start_time=at(time.time() + 3600))))
    async with running_worker(vhost.url, prefetch_seconds=1) as worker:
        due = time.time() + 5
        body = run_body(probe(tmp_path), scheduled_start_time=at(due))
        await publish_raw(vhost.url, body)
        await wait_until(lambda: worker.metrics.parked.labels("default", "default")._value.get())
        await publish_raw(vhost.url, {"id": body["id"], "reason": "not any more"},
                          routing_key="run.cancel.default")
        await events.wait_terminal([body["id"]], timeout=15)
        cancelled_at = time.time()
    assert events.types(body["id"]) == ["run.cancelled"]
    assert events.terminal(body["id"])[0].data["reason"] == "not any more"
    assert cancelled_at < due + 1.5
    assert not started_runs(tmp_path)


async def test_a_run_due_two_minutes_ago_starts_at_once(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path), scheduled_start_time=at(time.time() - 120))
    async with running_worker(vhost.url):
        published = time.time()
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]])
    assert started_runs(tmp_path)[body["id"]]["t"] - published < 1.0
    pending = events.of(body["id"])[0]
    assert pending.type == "mq_worker.run.pending"
    assert 119 < pending.data["late_by_seconds"] < 125


async def test_mixed_delays_start_in_order_of_due_time(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    base = time.time()
    delays = [7, 3, 5, 2.5, 6, 4]
    bodies = {run_body(probe(tmp_path), scheduled_start_time=at(base + d))["id"]: base + d
              for d in delays}
    async with running_worker(vhost.url, prefetch_seconds=1, limit=4):
        for run_id, due in bodies.items():
            await publish_raw(vhost.url, run_body(probe(tmp_path), id=run_id,
                                                  scheduled_start_time=at(due)))
        await events.wait_terminal(list(bodies), timeout=20)
    starts = {r: rec["t"] for r, rec in started_runs(tmp_path).items()}
    assert sorted(starts, key=starts.__getitem__) == sorted(bodies, key=bodies.__getitem__)
    for run_id, due in bodies.items():
        assert 0 <= starts[run_id] - due < 1.0


async def test_publisher_parks_far_runs_itself(vhost: VHost, tmp_path: Path) -> None:
    run = RunMessage.model_validate(
        run_body(probe(tmp_path), scheduled_start_time=at(time.time() + 600)))
    async with Publisher(vhost.url) as publisher:
        await publisher.submit(run)
    # Nothing consumes these queues: every message in them is ready.
    ladder = [delay_name(level) for level in range(DELAY_LEVELS)]
    counts = await ready_counts(vhost.url, ["mq_worker.default.default", *ladder])
    assert sum(counts[q] for q in ladder) == 1
    assert counts["mq_worker.default.default"] == 0

