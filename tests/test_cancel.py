"""Cancellation pushed over RabbitMQ: running, held, queued and not-yet-published runs."""

from __future__ import annotations

import statistics
import time
import uuid
from pathlib import Path

import anyio
import psutil
import pytest

from mq_worker.publisher import Publisher
from tests.helpers import (
    EventLog,
    VHost,
    probe,
    publish_raw,
    ready_counts,
    run_body,
    running_worker,
    started_runs,
    until_no_run_left,
    wait_until,
)

WORK_QUEUE = "mq_worker.default.default"

pytestmark = pytest.mark.anyio


async def cancel_raw(url: str, run_id: str, pool: str = "default", reason: str | None = None,
                     ) -> None:
    body: dict[str, str] = {"id": run_id}
    if reason is not None:
        body["reason"] = reason
    await publish_raw(url, body, routing_key=f"run.cancel.{pool}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_running_process_tree_is_gone_after_cancel(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids"
    command = f"sh -c 'sleep 300 & echo $! > {pids_file}; echo $$ >> {pids_file}; sleep 300; wait'"
    body = run_body(command)
    async with running_worker(vhost.url) as worker:
        await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: "run.submitted" in events.types(body["id"]))
        pids = await wait_until(
            lambda: pids_file.exists() and len(pids_file.read_text().split()) == 2
            and [int(p) for p in pids_file.read_text().split()])
        assert all(_alive(p) for p in pids)
        await cancel_raw(vhost.url, body["id"], reason="no longer needed")
        await events.wait_terminal([body["id"]], timeout=15)
        await wait_until(lambda: not any(_alive(p) for p in pids), timeout=5)
        assert worker.free_slots == 4

    assert events.types(body["id"]) == ["run.pending", "run.submitted", "run.cancelled"]
    cancelled = events.terminal(body["id"])[0]
    assert cancelled.data["reason"] == "no longer needed"
    assert cancelled.data["status_code"] == -15


async def test_process_ignoring_sigterm_is_killed_after_grace(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(job_variables={
        "command": probe(tmp_path, sleep=300, extra="--ignore-term"), "grace_seconds": 1})
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, body)
        await wait_until(lambda: body["id"] in started_runs(tmp_path))
        began = time.monotonic()
        await cancel_raw(vhost.url, body["id"])
        await events.wait_terminal([body["id"]])
        took = time.monotonic() - began
    cancelled = events.terminal(body["id"])[0]
    assert cancelled.type == "mq_worker.run.cancelled"
    assert cancelled.data["status_code"] == -9
    assert 0.9 < took < 10


async def test_run_waiting_for_a_slot_is_cancelled_and_never_runs(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    # The blocker holds the only slot until the worker has the queued run's cancel.
    gate = tmp_path / "cancel-known"
    blocker = run_body(probe(tmp_path, extra=f"--gate {gate}"))
    queued = run_body(probe(tmp_path))
    async with running_worker(vhost.url, limit=1) as worker:
        await publish_raw(vhost.url, blocker)
        await events.wait_for(lambda _: "run.submitted" in events.types(blocker["id"]))
        await publish_raw(vhost.url, queued)
        await cancel_raw(vhost.url, queued["id"], reason="queued and cancelled")
        await wait_until(lambda: worker._registry.get(uuid.UUID(queued["id"])) is not None)
        gate.touch()
        await events.wait_terminal([blocker["id"], queued["id"]], timeout=20)
        await until_no_run_left(vhost.url, [WORK_QUEUE], worker)
    assert events.types(queued["id"]) == ["run.cancelled"]
    assert events.terminal(queued["id"])[0].data["reason"] == "queued and cancelled"
    assert queued["id"] not in started_runs(tmp_path)
    # The worker's connection is closed: a message it had not acknowledged is ready again.
    assert await ready_counts(vhost.url, [WORK_QUEUE]) == {WORK_QUEUE: 0}


async def test_held_run_waiting_for_its_start_time_is_cancelled(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    # Due far enough ahead for the cancel to come first on a loaded machine; held, not parked.
    due = time.time() + 30
    body = run_body(probe(tmp_path), scheduled_start_time=_rfc3339(due))
    async with running_worker(vhost.url, prefetch_seconds=60) as worker:
        await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: "run.pending" in events.types(body["id"]))
        assert worker.in_flight == [uuid.UUID(body["id"])]
        await cancel_raw(vhost.url, body["id"])
        await events.wait_terminal([body["id"]])
        assert worker.free_slots == 4
        await until_no_run_left(vhost.url, [WORK_QUEUE], worker)
    assert events.types(body["id"]) == ["run.pending", "run.cancelled"]
    assert time.time() < due
    assert await ready_counts(vhost.url, [WORK_QUEUE]) == {WORK_QUEUE: 0}
    assert not started_runs(tmp_path)


async def test_run_cancelled_while_no_worker_runs_is_not_started_later(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    async with Publisher(vhost.url) as publisher:
        body = run_body(probe(tmp_path))
        from mq_worker.messages import RunMessage

        await publisher.submit(RunMessage.model_validate(body))
        await publisher.cancel(body["id"], reason="before any worker")
        late = run_body(probe(tmp_path))
        # Cancelled before it was even published.
        await publisher.cancel(late["id"], reason="cancelled first")
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, late)
        await events.wait_terminal([body["id"], late["id"]])
    assert events.types(body["id"]) == ["run.cancelled"]
    assert events.terminal(body["id"])[0].data["reason"] == "before any worker"
    assert events.types(late["id"]) == ["run.cancelled"]
    assert not started_runs(tmp_path)


async def test_repeated_and_unknown_cancels(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path, sleep=300))
    follow_up = run_body(probe(tmp_path))
    async with running_worker(vhost.url) as worker:
        await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: "run.submitted" in events.types(body["id"]))
        for _ in range(3):
            await cancel_raw(vhost.url, body["id"])
        await cancel_raw(vhost.url, str(uuid.uuid4()), reason="nobody knows this run")
        await events.wait_terminal([body["id"]])
        await publish_raw(vhost.url, follow_up)
        await events.wait_terminal([follow_up["id"]])
        assert worker.free_slots == 4
    assert [e.type for e in events.events if e.type == "mq_worker.run.cancelled"] == [
        "mq_worker.run.cancelled"]
    assert events.types(follow_up["id"])[-1] == "run.completed"


async def test_cancel_racing_a_natural_exit_gives_one_terminal_event(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    bodies = [run_body(probe(tmp_path, sleep=0.2)) for _ in range(20)]
    async with running_worker(vhost.url, limit=20):
        for body in bodies:
            await publish_raw(vhost.url, body)
        await wait_until(lambda: len(started_runs(tmp_path)) == 20)
        await anyio.sleep(0.15)  # not a wait: aims the cancels at the runs' natural end
        for body in bodies:
            await cancel_raw(vhost.url, body["id"])
        await events.wait_terminal([b["id"] for b in bodies])
    # worker.stopped is the worker's last event: every event before it has arrived.
    await events.wait_for(lambda evs: any(e.type == "mq_worker.worker.stopped" for e in evs))
    for body in bodies:
        assert len(events.terminal(body["id"])) == 1, events.types(body["id"])


async def test_invalid_cancel_is_reported_and_ignored(vhost: VHost, events: EventLog) -> None:
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, b"{broken", routing_key="run.cancel.default")
        rejected = await events.wait_for(
            lambda evs: [e for e in evs if e.type == "mq_worker.run.rejected"])
    assert "invalid cancel" in rejected[0].data["reason"]


async def test_cancel_latency(vhost: VHost, events: EventLog, tmp_path: Path) -> None:
    """Cancel published -> SIGTERM in the process: printed, not asserted beyond sanity."""
    latencies = []
    async with running_worker(vhost.url, limit=2):
        for _ in range(10):
            marker = tmp_path / f"term-{uuid.uuid4().hex}"
            body = run_body(probe(tmp_path, sleep=300, extra=f"--term-marker {marker}"))
            await publish_raw(vhost.url, body)
            await wait_until(lambda b=body: b["id"] in started_runs(tmp_path))
            sent = time.time()
            await cancel_raw(vhost.url, body["id"])
            await events.wait_terminal([body["id"]])
            latencies.append(float(marker.read_text()) - sent)
    print(f"\ncancel published -> SIGTERM handled: p50 {statistics.median(latencies)*1e3:.1f} ms, "
          f"max {max(latencies)*1e3:.1f} ms")
    assert max(latencies) < 2.0


def _rfc3339(timestamp: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC).isoformat()

