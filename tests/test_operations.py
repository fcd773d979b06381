"""Operating a worker: the health endpoint, its metrics and `mq-worker status`, on a real broker."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mq_worker.health import serve_health
from mq_worker.publisher import Publisher, new_run
from mq_worker.workers.base import BaseWorker
from tests.contract import assert_events_conform
from tests.helpers import (
    PYTHON,
    EventLog,
    VHost,
    probe,
    publish_raw,
    running_worker,
    started_runs,
    wait_until,
)

pytestmark = pytest.mark.anyio


async def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:port/path."""
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def wait_health(port: int, status: int, timeout: float = 15) -> dict[str, Any]:
    """Poll /health (an outside view, as a load balancer would) until it answers `status`."""
    with anyio.fail_after(timeout):
        while True:
            got, _, body = await get(port, "/health")
            if got == status:
                return dict(json.loads(body))
            await anyio.sleep(0.05)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@asynccontextmanager
async def health_endpoint(worker: BaseWorker) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_health, worker, 0)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


# -- health ------------------------------------------------------------------------


async def test_health_is_503_while_the_broker_connection_is_down_then_200_again(
    vhost: VHost, events: EventLog, worker_processes: Any
) -> None:
    worker = worker_processes(vhost.url, "--health-port", "0", "--heartbeat-seconds", "1")
    listening = await wait_until(
        lambda: [line for line in worker.log_lines()
                 if line.get("event") == "health endpoint listening"], timeout=30)
    port = int(listening[0]["port"])
    assert port > 0

    up = await wait_health(port, 200, timeout=30)
    assert up["status"] == "ok" and up["reason"] == "consuming"
    assert up["free_slots"] == 4 and up["in_flight"] == 0

    assert vhost.close_connections(f"mq_worker {worker.name}") == 1
    down = await wait_health(port, 503, timeout=5)
    assert down["status"] == "unavailable"
    assert "reconnecting" in down["reason"] or "consuming" in down["reason"]

    await wait_health(port, 200, timeout=20)
    status, content_type, text = await get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    values = samples(text)
    assert values[("mq_worker_reconnects_total", ())] == 1
    assert values[("mq_worker_connected", ())] == 1

    worker.signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(worker.wait) == 0


async def test_health_reports_why_it_is_unavailable(vhost: VHost) -> None:
    async with running_worker(vhost.url) as worker, health_endpoint(worker) as port:
        assert (await wait_health(port, 200))["reason"] == "consuming"
        assert worker._consumer is not None
        worker._consumer.pause("outbox")
        assert "outbox" in (await wait_health(port, 503))["reason"]
        worker._consumer.resume("outbox")
        await wait_health(port, 200)
        status, _, _ = await get(port, "/nothing-here")
        assert status == 404


# -- metrics -----------------------------------------------------------------------


async def test_metrics_count_the_runs_that_were_really_published(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    completed = [new_run(probe(tmp_path), name=f"ok-{i}") for i in range(5)]
    exit_code = new_run(probe(tmp_path, exit_code=3), name="exit-3")
    no_executable = new_run("/no/such/executable", name="cannot-start")
    long = new_run(probe(tmp_path, sleep=300), name="cancelled-while-running")
    async with running_worker(vhost.url, limit=4) as worker, health_endpoint(worker) as port, \
            Publisher(vhost.url) as publisher:
        for run in [*completed, exit_code, no_executable, long]:
            await publisher.submit(run)
        await publish_raw(vhost.url, b"not a run at all")
        await publish_raw(vhost.url, {"id": "not-a-uuid"}, routing_key="run.cancel.default")
        await wait_until(lambda: str(long.id) in started_runs(tmp_path))
        await publisher.cancel(long.id, reason="metrics test")
        runs = [*completed, exit_code, no_executable, long]
        await events.wait_terminal([r.id for r in runs], timeout=30)
        await events.wait_for(lambda evs: len(
            [e for e in evs if e.type == "mq_worker.run.rejected"]) == 2)
        await wait_until(lambda: worker.free_slots == 4 and not worker.in_flight)
        status, _, text = await get(port, "/metrics")

    assert status == 200
    values = samples(text)
    labels = (("pool", "default"), ("queue", "default"))

    def count(name: str) -> float:
        return values.get((f"mq_worker_runs_{name}_total", labels), 0.0)

    outcomes = [events.terminal(r.id)[0].type.rsplit(".", 1)[-1] for r in runs]
    assert outcomes == ["completed"] * 5 + ["crashed", "crashed", "cancelled"]
    assert count("completed") == 5
    assert count("crashed") == 2
    assert count("cancelled") == 1
    assert count("rejected") == 1  # the invalid run; the invalid cancel has no queue:
    assert values[("mq_worker_runs_rejected_total", (("pool", "default"), ("queue", "")))] == 1
    assert count("pending") == 8  # every valid run was taken
    assert count("started") == 7  # all but the one that could not start
    assert count("parked") == 0
    assert values[("mq_worker_runs_in_flight", ())] == 0
    assert values[("mq_worker_free_slots", ())] == 4
    assert values[("mq_worker_outbox_depth", ())] == 0
    assert values[("mq_worker_publish_to_start_seconds_count", labels)] == 7
    assert values[("mq_worker_run_duration_seconds_count", labels)] == 7
    assert values[("mq_worker_reconnects_total", ())] == 0
    assert values[("mq_worker_connected", ())] == 1


async def test_metrics_count_cancels_of_runs_that_never_started(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    held = new_run(probe(tmp_path), scheduled_start_time=datetime.now(UTC) + timedelta(seconds=8))
    early = new_run(probe(tmp_path))
    async with running_worker(vhost.url) as worker, health_endpoint(worker) as port, \
            Publisher(vhost.url) as publisher:
        await publisher.submit(held)
        await events.wait_for(lambda _: events.types(held.id) == ["run.pending"])
        await publisher.cancel(held.id)
        await publisher.cancel(early.id)
        await events.wait_terminal([held.id])
        await publisher.submit(early)
        await events.wait_terminal([early.id])
        _, _, text = await get(port, "/metrics")
    values = samples(text)
    labels = (("pool", "default"), ("queue", "default"))
    assert values[("mq_worker_runs_cancelled_total", labels)] == 2
    assert values.get(("mq_worker_runs_started_total", labels), 0) == 0
    assert events.types(early.id) == ["run.cancelled"]
    assert not started_runs(tmp_path)


# -- status --------------------------------------------------------------------------


def mq_worker_status(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "mq_worker", "status", "--url", url, *args],
                          capture_output=True, text=True, timeout=60)


async def test_status_lists_live_workers_then_marks_a_killed_one_lost(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    one = worker_processes(vhost.url, "--heartbeat-seconds", "1", "--pool", "etl",
                           "--queue", "a", "--queue", "b", "--limit", "2", name="status-one")
    two = worker_processes(vhost.url, "--heartbeat-seconds", "1", "--pool", "etl",
                           "--queue", "a", "--limit", "3", name="status-two")
    worker_processes(vhost.url, "--heartbeat-seconds", "1", "--pool", "other", name="elsewhere")
    await events.wait_for(lambda evs: len(
        {e.subject for e in evs if e.type == "mq_worker.worker.started"}) == 3, timeout=30)
    async with Publisher(vhost.url) as publisher:
        busy = await publisher.submit(new_run(probe(tmp_path, sleep=300)), pool="etl", queue="b")
    await events.wait_for(lambda _: "run.submitted" in events.types(busy.id))

    # One-shot: a table of the workers that answer the ping.
    table = await anyio.to_thread.run_sync(lambda: mq_worker_status(vhost.url, "--pool", "etl"))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:6] == ["WORKER", "POOL", "QUEUES", "LIMIT", "IN", "FLIGHT"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"status-one", "status-two"}
    assert rows["status-one"][1:5] == ["etl", "a,b", "2", "1"]
    assert rows["status-two"][1:5] == ["etl", "a", "3", "0"]
    assert all(row[-1] == "live" for row in rows.values())

    as_json = await anyio.to_thread.run_sync(lambda: mq_worker_status(vhost.url, "--json"))
    snapshot = json.loads(as_json.stdout)
    assert {w["name"] for w in snapshot["workers"]} == {"status-one", "status-two", "elsewhere"}

    # Watching: a killed worker is marked lost after it misses three heartbeats.
    async with await anyio.open_process(
        [PYTHON, "-m", "mq_worker", "status", "--url", vhost.url, "--pool", "etl",
         "--watch", "--json"]
    ) as watch:
        assert watch.stdout is not None
        buffer = b""

        async def next_snapshot() -> dict[str, dict[str, Any]]:
            nonlocal buffer
            while b"\n" not in buffer:
                buffer += await watch.stdout.receive()  # type: ignore[union-attr]
            line, _, buffer = buffer.partition(b"\n")
            return {w["name"]: w for w in json.loads(line)["workers"]}

        with anyio.fail_after(20):
            workers = await next_snapshot()
            while set(workers) != {"status-one", "status-two"}:
                workers = await next_snapshot()
            assert all(w["state"] == "live" for w in workers.values())
            assert workers["status-one"]["in_flight"] == [str(busy.id)]

            one.process.kill()
            killed_at = anyio.current_time()
            while workers["status-one"]["state"] != "lost":
                workers = await next_snapshot()
            lost_after = anyio.current_time() - killed_at
            assert workers["status-two"]["state"] == "live"
            # The elected peer reports the lost worker and its run (before it stops itself).
            await events.wait_for(
                lambda evs: any(e.type == "mq_worker.worker.lost" for e in evs), timeout=10)
            await events.wait_terminal([busy.id], timeout=10)

            two.signal(signal.SIGTERM)
            while workers["status-two"]["state"] != "stopped":
                workers = await next_snapshot()
        watch.terminate()
    assert 2.0 < lost_after < 8.0

    lost = [e for e in events.events if e.type == "mq_worker.worker.lost"]
    assert lost[0].subject == "status-one" and lost[0].data["reported_by"] == "status-two"
    assert lost[0].data["in_flight"] == [str(busy.id)]
    assert events.terminal(busy.id)[0].data["reason"] == "worker-lost"
    # Those events, like every other the workers sent, follow the contract.
    assert "mq_worker.worker.lost" in assert_events_conform(events.raw)


def test_status_table_marks_workers_by_their_own_heartbeat_interval() -> None:
    from datetime import UTC, datetime

    from mq_worker.events import Event
    from mq_worker.status import WorkerTable

    def event(kind: str, worker: str, pool: str = "p", **data: Any) -> Event:
        return Event(id="e", source="s", type=f"mq_worker.worker.{kind}", subject=worker,
                     time=datetime.now(UTC), data={"worker": worker, "pool": pool, **data})

    table = WorkerTable(pool="p")
    assert table.observe(event("heartbeat", "fast", queues=["a"], limit=2, in_flight=["r1"],
                               heartbeat_seconds=1), now=100.0)
    assert table.observe(event("started", "slow", queues=["a"], limit=2,
                               heartbeat_seconds=30), now=100.0)
    assert not table.observe(event("heartbeat", "other", pool="q", heartbeat_seconds=1), now=100)
    assert not table.check(now=102.9)
    assert table.check(now=103.1)
    assert {r.name: r.state for r in table.rows()} == {"fast": "lost", "slow": "live"}
    assert table.observe(event("heartbeat", "fast", heartbeat_seconds=1), now=104.0)
    assert table.workers["fast"].state == "live"  # it came back
    assert table.observe(event("stopped", "slow", heartbeat_seconds=30), now=105.0)
    assert table.observe(event("lost", "ghost", last_seen="x", in_flight=[], reported_by="y"))
    assert {r.name: r.state for r in table.rows()} == {
        "fast": "live", "slow": "stopped", "ghost": "lost"}
    assert table.check(now=10_000.0) and table.workers["fast"].state == "lost"
    assert table.workers["slow"].state == "stopped"  # stopped stays stopped
    rendered = table.render(now=10_000.0).splitlines()
    assert rendered[0].split() == ["WORKER", "POOL", "QUEUES", "LIMIT", "IN", "FLIGHT", "LAST",
                                   "SEEN", "STATE"]
    ghost = next(line for line in rendered if line.startswith("ghost"))
    assert ghost.split() == ["ghost", "p", "-", "-", "0", "-", "lost"]
    assert table.snapshot()["workers"][0]["name"] == "fast"


def test_a_health_port_in_use_fails_clearly(vhost: VHost) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [PYTHON, "-m", "mq_worker", "start", "--url", vhost.url, "--health-port", str(port)],
            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert f"cannot serve the health endpoint on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
