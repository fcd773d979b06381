"""The elected reporter's watch over its pool, under peers that beat at another pace
than its own, worker events that are old or copied, and its stream deleted under it."""

from __future__ import annotations

import urllib.parse
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mq_worker.events import Event
from tests.helpers import (
    EventLog,
    VHost,
    management,
    probe,
    publish_raw,
    queue_exists,
    run_body,
    started_runs,
    until_ready,
    wait_until,
)

pytestmark = pytest.mark.anyio

HEARTBEAT = "mq_worker.worker.heartbeat"
LOST = "mq_worker.worker.lost"
STREAM = "mq_worker.heartbeats-default"
MISSED = 3  # heartbeats a peer may miss before the reporter finds it lost


def _lost(events: EventLog, name: str) -> list[Event]:
    return [e for e in events.events if e.type == LOST and e.subject == name]


async def _started(events: EventLog, worker: Any) -> None:
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.started" and e.subject == worker.name for e in evs),
        timeout=60)


def _worker_event(kind: str, worker: str, *, when: datetime | None = None,
                  heartbeat_seconds: float = 1, pool: str = "default",
                  runs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A worker event as a worker of another version could publish it."""
    return {
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": f"/workers/{worker}",
        "type": f"mq_worker.worker.{kind}", "subject": worker,
        "time": (when or datetime.now(UTC)).isoformat(),
        "data": {"worker": worker, "pool": pool, "heartbeat_seconds": heartbeat_seconds,
                 "queues": ["default"], "in_flight": [r["id"] for r in runs or []],
                 "runs": runs or []},
    }


async def _publish_worker_event(url: str, event: dict[str, Any]) -> None:
    """As a worker routes them: to subscribers, and (BCC) to its pool's heartbeat stream."""
    await publish_raw(url, event, routing_key=event["type"], exchange="mq_worker.events",
                      headers={"BCC": ["workers.default"]})


async def _found_lost_in_time(events: EventLog, url: str) -> str:
    """Publish the heartbeat of a worker that never beats again, wait for its report,
    and return its name: once it is reported, whatever was published before it and
    was going to be reported lost (at the same interval) has been."""
    name = f"silent-{uuid.uuid4().hex[:6]}"
    await _publish_worker_event(url, _worker_event("heartbeat", name))
    await events.wait_for(lambda _: _lost(events, name), timeout=30)
    return name


async def test_a_fast_worker_watched_by_a_slow_reporter_is_found_lost_within_its_own_intervals(
    vhost: VHost, events: EventLog, worker_processes: Any
) -> None:
    slow, fast = 60.0, 2.0
    reporter = worker_processes(vhost.url, "--heartbeat-seconds", str(slow))
    await _started(events, reporter)
    doomed = worker_processes(vhost.url, "--heartbeat-seconds", str(fast))
    await events.wait_for(lambda evs: any(
        e.type == HEARTBEAT and e.subject == doomed.name for e in evs), timeout=60)
    doomed.kill()

    [lost] = await events.wait_for(lambda _: _lost(events, doomed.name), timeout=3 * slow)
    assert lost.data["reported_by"] == reporter.name
    last_heartbeat = max(e.time for e in events.events
                         if e.type == HEARTBEAT and e.subject == doomed.name)
    delay = (lost.time - last_heartbeat).total_seconds()
    print(f"found lost {delay:.1f} s after its last heartbeat "
          f"(it beat every {fast} s, the reporter every {slow} s)")
    # Silent for `missed` of its own intervals, then found at the next check (at most half
    # an interval later), with one interval to spare for a loaded machine.
    assert delay <= (MISSED + 2) * fast, delay


async def test_old_copied_and_misrouted_worker_events_cause_no_false_report(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    reporter = worker_processes(vhost.url, "--heartbeat-seconds", "1", "--limit", "1")
    await _started(events, reporter)
    holder = worker_processes(vhost.url, "--heartbeat-seconds", "1", "--limit", "1")
    await _started(events, holder)
    # Each holds a run, so that a copy taken for a restart would crash it.
    bodies = [run_body(probe(tmp_path, sleep=120)) for _ in range(2)]
    for body in bodies:
        await publish_raw(vhost.url, body)
    await wait_until(lambda: len(started_runs(tmp_path)) == 2, timeout=30)
    for worker in (reporter, holder):
        started = next(e for e in events.events
                       if e.type == "mq_worker.worker.started" and e.subject == worker.name)
        await events.wait_for(lambda evs, name=worker.name: any(
            e.type == HEARTBEAT and e.subject == name and e.data["in_flight"] for e in evs),
            timeout=30)
        # Its own started event, published again while it holds the run: not a restart.
        await _publish_worker_event(vhost.url, started.model_dump(mode="json"))
    # An hour-old heartbeat of a worker long gone, holding a run, published again.
    ghost_run = {"id": str(uuid.uuid4()), "name": "old", "queue": "default",
                 "state": "running", "infrastructure_pid": "1"}
    ghost = f"ghost-{uuid.uuid4().hex[:6]}"
    await _publish_worker_event(vhost.url, _worker_event(
        "heartbeat", ghost, when=datetime.now(UTC) - timedelta(hours=1), runs=[ghost_run]))
    # A heartbeat of another pool sent to this pool's stream.
    stray = f"stray-{uuid.uuid4().hex[:6]}"
    await _publish_worker_event(vhost.url, _worker_event("heartbeat", stray, pool="other"))

    await _found_lost_in_time(events, vhost.url)
    assert not _lost(events, reporter.name) and not _lost(events, holder.name), \
        "a copy of a started event was taken for a restart"
    assert not [b["id"] for b in bodies if events.terminal(b["id"])]
    assert not _lost(events, ghost) and not events.of(ghost_run["id"])
    assert not _lost(events, stray)
    # Each refused, and said so.
    rejected = await events.wait_for(lambda evs: [
        e.data["reason"] for e in evs if e.type == "mq_worker.run.rejected"
        and e.data.get("message_kind") == "worker-event"], timeout=15)
    # Once a second at most, the next saying how many were folded into it.
    assert "s ago" in rejected[0], rejected
    await until_ready(vhost.url, {"mq_worker.dead": 2}, at_least=True, timeout=30)
    assert reporter.process.poll() is None and holder.process.poll() is None


async def test_a_deleted_heartbeat_stream_is_declared_again_and_followed_again(
    vhost: VHost, events: EventLog, worker_processes: Any
) -> None:
    reporter = worker_processes(vhost.url, "--heartbeat-seconds", "1")
    await _started(events, reporter)
    peers = [worker_processes(vhost.url, "--heartbeat-seconds", "1") for _ in range(2)]
    for worker in (reporter, *peers):
        await events.wait_for(lambda evs, name=worker.name: any(
            e.type == HEARTBEAT and e.subject == name for e in evs), timeout=60)
    management("DELETE", f"/queues/{vhost.name}/{STREAM}")
    await wait_until(lambda: queue_exists(vhost.url, STREAM), timeout=30)
    # Followed again by a reporter (before: nobody declared it again, and the reporter,
    # hearing nobody, reported its live peers lost 3 intervals after the deletion).
    await wait_until(lambda: _stream_consumers(vhost) >= 1, timeout=30)
    # Four intervals of three workers' heartbeats: long enough for a false report to come.
    await wait_until(lambda: _stream_messages(vhost) >= 4 * 3, timeout=60)
    assert not [e.subject for e in events.events if e.type == LOST]
    assert all(w.process.poll() is None for w in (reporter, *peers))


def _stream_consumers(vhost: VHost) -> int:
    return sum(1 for c in management("GET", f"/consumers/{vhost.name}")
               if c["queue"]["name"] == STREAM)


def _stream_messages(vhost: VHost) -> int:
    return int(management("GET", f"/queues/{vhost.name}/{STREAM}").get("messages") or 0)


def _stream_readers(vhost: VHost) -> list[str]:
    """The workers reading the heartbeat stream (its elected reporter)."""
    names = []
    for consumer in management("GET", f"/consumers/{vhost.name}"):
        if consumer["queue"]["name"] != STREAM or not consumer["channel_details"]:
            continue
        connection = urllib.parse.quote(consumer["channel_details"]["connection_name"], safe="")
        properties = management("GET", f"/connections/{connection}")["client_properties"]
        names.append(properties["connection_name"].removeprefix("mq_worker "))
    return names


async def test_a_peer_killed_just_after_the_heartbeat_stream_was_deleted_is_reported_once(
    vhost: VHost, events: EventLog, worker_processes: Any
) -> None:
    workers = [worker_processes(vhost.url, "--heartbeat-seconds", "1") for _ in range(3)]
    for worker in workers:
        await events.wait_for(lambda evs, name=worker.name: any(
            e.type == HEARTBEAT and e.subject == name for e in evs), timeout=60)
    [reporter] = await wait_until(lambda: _stream_readers(vhost), timeout=30)
    management("DELETE", f"/queues/{vhost.name}/{STREAM}")
    # Killed before its next heartbeat can reach the stream declared anew: only the
    # deleted stream, and the reporter, had heard of it (before: nobody reported it).
    victim = next(w for w in workers if w.name != reporter)
    victim.kill()
    await wait_until(lambda: queue_exists(vhost.url, STREAM), timeout=30)
    await wait_until(lambda: _stream_readers(vhost), timeout=30)

    await events.wait_for(lambda _: _lost(events, victim.name), timeout=15)
    # Whatever else was going to be reported by then has been.
    silent = await _found_lost_in_time(events, vhost.url)
    assert sorted(e.subject for e in events.events if e.type == LOST) == sorted(
        [victim.name, silent])
    assert all(w.process.poll() is None for w in workers if w is not victim)
