"""Scaling out on a real broker: what idle workers cost, who hears whose heartbeats,
reporter failover without a warm table, and a worker starting behind many cancels.

Costs are counted by the broker itself (its management API), from outside the workers.
"""

from __future__ import annotations

import json
import signal
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import anyio
import pytest

from mq_worker.cancel_snapshots import SNAPSHOT_EVERY
from mq_worker.topology import CANCELS_STREAM, CONTROL_STREAM, RUNS_EXCHANGE
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

# Samples of the broker's statistics are 5 s apart (collect_statistics_interval).
SAMPLE_SECONDS = 5


def _rate(stats: dict[str, Any] | None) -> float | None:
    """Deliveries per second between the oldest and newest sample of `stats`."""
    samples = ((stats or {}).get("deliver_get_details") or {}).get("samples") or []
    if len(samples) < 2:
        return None
    newest, oldest = samples[0], samples[-1]
    seconds = (newest["timestamp"] - oldest["timestamp"]) / 1000
    return (newest["sample"] - oldest["sample"]) / seconds if seconds > 0 else None


WINDOW_SECONDS = 15


async def vhost_delivery_rate(vhost: VHost, window: int = WINDOW_SECONDS) -> float:
    """Broker deliveries per second in `vhost` over the last `window` seconds."""
    # Measuring, not synchronising: the broker needs `window` seconds of samples.
    await anyio.sleep(window + SAMPLE_SECONDS)
    return vhost_delivery_rate_so_far(vhost, window)


def vhost_delivery_rate_so_far(vhost: VHost, window: int = WINDOW_SECONDS) -> float:
    path = (f"/vhosts/{urllib.parse.quote(vhost.name, safe='')}"
            f"?msg_rates_age={window}&msg_rates_incr={SAMPLE_SECONDS}")
    rate = _rate(management("GET", path).get("message_stats"))
    assert rate is not None, "the management API has no samples of deliveries"
    return rate


# The streams every worker of a vhost follows whole, whatever its pool. Each worker that
# starts publishes markers to them (two to the cancel stream, mq_worker.cancel_markers; one
# to the control stream, mq_worker.control), and every follower reads them: a pool of 8
# starting costs a worker of another pool 24 deliveries, 1.6/s over a 15 s window, which
# the statistics can count seconds after the pool's consumers are seen. Both streams are
# bound to the runs exchange only: no heartbeat (events exchange) can reach them.
SHARED_STREAMS = frozenset({CANCELS_STREAM, CONTROL_STREAM})


async def connection_delivery_rate(vhost: VHost, connection_name: str,
                                   window: int = WINDOW_SECONDS, *,
                                   without: frozenset[str] = frozenset()) -> float:
    """Broker deliveries per second to the channels of the connection named
    `connection_name` (its client-provided name) over the last `window` seconds; a
    channel consuming only queues of `without` is left out."""
    await anyio.sleep(window + SAMPLE_SECONDS)
    return connection_delivery_rate_so_far(vhost, connection_name, window, without=without)


def connection_delivery_rate_so_far(vhost: VHost, connection_name: str,
                                    window: int = WINDOW_SECONDS, *,
                                    without: frozenset[str] = frozenset()) -> float:
    quoted = urllib.parse.quote(vhost.name, safe="")
    connections = [c["name"] for c in management("GET", f"/vhosts/{quoted}/connections")
                   if c.get("user_provided_name") == connection_name]
    assert len(connections) == 1, connections
    total = 0.0
    for channel in management("GET", f"/vhosts/{quoted}/channels"):
        if channel["connection_details"]["name"] != connections[0]:
            continue
        detail = management(
            "GET", f"/channels/{urllib.parse.quote(channel['name'], safe='')}"
                   f"?msg_rates_age={window}&msg_rates_incr={SAMPLE_SECONDS}")
        consumed = {c["queue"]["name"] for c in detail.get("consumer_details") or []}
        if consumed and consumed <= without:
            continue
        total += _rate(detail.get("message_stats")) or 0.0
    return total


async def start_idle_pool(vhost: VHost, worker_processes: Any, count: int, pool: str,
                          *extra: str) -> list[Any]:
    workers = [worker_processes(vhost.url, "--heartbeat-seconds", "1", "--pool", pool,
                                "--log-level", "WARNING", *extra) for _ in range(count)]
    queue = f"mq_worker.{pool}.default"
    await wait_until(lambda: len(vhost.consumers(queue)) == count, timeout=60 + 5 * count,
                     interval=0.5)
    return workers


async def _idle_pool_costs_at_most_3n_plus_10(
    vhost: VHost, worker_processes: Any, count: int
) -> None:
    await start_idle_pool(vhost, worker_processes, count, "idle")
    # Let the start (one election token per worker, the reporter's replay) settle.
    await anyio.sleep(3)
    rate = await vhost_delivery_rate(vhost)
    print(f"{count} idle workers at --heartbeat-seconds 1: {rate:.1f} deliveries/s")
    # Quadratic designs (every worker hearing every heartbeat) give count**2 + count.
    assert rate <= 3 * count + 10, rate


async def test_idle_pool_costs_linear_deliveries_and_none_reach_another_pool(
    vhost: VHost, worker_processes: Any
) -> None:
    """The two claims of the slow tests below, measured over one window of samples
    (each measurement needs 20 s of the broker's statistics)."""
    alone = await _start_alone(vhost, worker_processes)
    await start_idle_pool(vhost, worker_processes, 8, "idle")
    await anyio.sleep(3)
    await anyio.sleep(WINDOW_SECONDS + SAMPLE_SECONDS)  # measuring, as above
    to_alone = connection_delivery_rate_so_far(vhost, f"mq_worker {alone.name}",
                                               without=SHARED_STREAMS)
    # 8 workers of one pool, plus the one alone in its own: 9 workers' costs at most.
    assert vhost_delivery_rate_so_far(vhost) <= 3 * 9 + 10
    # Its own heartbeat (it is its pool's reporter) and an election token now and then;
    # the other pool's 8 heartbeats per second must not reach it.
    assert to_alone < 2.5, to_alone


@pytest.mark.slow
@pytest.mark.parametrize("count", [4, 8, 12, 24])
async def test_idle_pool_broker_deliveries_grow_linearly(
    vhost: VHost, worker_processes: Any, count: int
) -> None:
    await _idle_pool_costs_at_most_3n_plus_10(vhost, worker_processes, count)


@pytest.mark.slow
async def test_a_worker_receives_no_heartbeat_of_another_pool(
    vhost: VHost, worker_processes: Any
) -> None:
    alone = await _start_alone(vhost, worker_processes)
    await start_idle_pool(vhost, worker_processes, 6, "crowd")
    await anyio.sleep(3)
    rate = await connection_delivery_rate(vhost, f"mq_worker {alone.name}",
                                          without=SHARED_STREAMS)
    print(f"deliveries/s to the only worker of its pool, next to 6 of another: {rate:.1f}")
    # Its own heartbeat (it is its pool's reporter) and an election token now and then;
    # the other pool's 6 heartbeats per second must not reach it.
    assert rate < 2.5, rate


async def _start_alone(vhost: VHost, worker_processes: Any) -> Any:
    alone = worker_processes(vhost.url, "--heartbeat-seconds", "1", "--pool", "alone")
    await wait_until(lambda: len(vhost.consumers("mq_worker.alone.default")) == 1, timeout=60)
    return alone


async def test_a_new_reporter_reports_a_worker_that_died_before_it_started(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    """The reporter that takes over has never seen the dead worker's heartbeats."""
    interval = "4"
    reporter = worker_processes(vhost.url, "--heartbeat-seconds", interval, "--limit", "1")
    await wait_until(lambda: len(vhost.consumers("mq_worker.default.default")) == 1, timeout=60)
    doomed = worker_processes(vhost.url, "--heartbeat-seconds", interval, "--limit", "1")
    await wait_until(lambda: len(vhost.consumers("mq_worker.default.default")) == 2, timeout=60)
    runs = [run_body(probe(tmp_path, sleep=120)) for _ in range(2)]
    for body in runs:
        await publish_raw(vhost.url, body)
    await wait_until(lambda: len(started_runs(tmp_path)) == 2, timeout=30)
    # A process can start before its `submitted` event reaches this subscriber.
    await events.wait_for(lambda _: all("run.submitted" in events.types(b["id"]) for b in runs))
    on_doomed = [b["id"] for b in runs if any(
        e.type == "mq_worker.run.submitted" and e.data["worker"] == doomed.name
        for e in events.of(b["id"]))]
    assert len(on_doomed) == 1
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.heartbeat" and e.subject == doomed.name
        and e.data["in_flight"] == on_doomed for e in evs))

    doomed.kill()
    successor = worker_processes(vhost.url, "--heartbeat-seconds", interval, "--limit", "1")
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.started" and e.subject == successor.name for e in evs),
        timeout=30)
    assert not [e for e in events.events if e.type == "mq_worker.worker.lost"], \
        "the first reporter was too quick: the test could not kill it in time"
    reporter.kill()

    lost = await events.wait_for(lambda evs: [
        e for e in evs if e.type == "mq_worker.worker.lost" and e.subject == doomed.name],
        timeout=30)
    await events.wait_terminal(on_doomed, timeout=10)
    terminal = events.terminal(on_doomed[0])
    assert [e.type for e in terminal] == ["mq_worker.run.crashed"]
    assert terminal[0].data["reason"] == "worker-lost"
    assert lost[0].data["reported_by"] == successor.name
    # The first reporter, killed too, is reported by its successor as well, and nobody twice.
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.lost" and e.subject == reporter.name for e in evs),
        timeout=30)
    reports = [e.subject for e in events.events if e.type == "mq_worker.worker.lost"]
    assert sorted(reports) == sorted([doomed.name, reporter.name])


async def test_a_ping_flood_is_answered_at_a_bounded_rate(
    vhost: VHost, events: EventLog, worker_processes: Any
) -> None:
    worker = worker_processes(vhost.url, "--heartbeat-seconds", "60")
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.started" and e.subject == worker.name for e in evs),
        timeout=60)
    ping = {"specversion": "1.0", "id": "x", "source": "/flood", "type": "mq_worker.worker.ping",
            "time": "2026-11-29T00:00:00Z", "data": {}}
    connection = await aio_pika.connect(vhost.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("mq_worker.events")
        began = anyio.current_time()
        for _ in range(2000):
            await exchange.publish(aio_pika.Message(json.dumps(ping).encode()),
                                   routing_key="mq_worker.worker.ping")
        flooded_for = anyio.current_time() - began

    def heartbeats() -> list[Any]:
        return [e for e in events.events
                if e.type == "mq_worker.worker.heartbeat" and e.subject == worker.name]

    # At least one answer comes, then the answers stop well short of the 2000 pings.
    await events.wait_for(lambda _: heartbeats(), timeout=10)
    await wait_until(lambda: worker.process.poll() is None, timeout=1)
    answered = len(heartbeats())
    await anyio.sleep(2)  # measuring: late answers would show up here
    assert len(heartbeats()) <= flooded_for + 6, (len(heartbeats()), answered, flooded_for)
    assert worker.process.poll() is None


async def test_status_ping_is_not_a_lifecycle_event(
    vhost: VHost, events: EventLog, worker_processes: Any
) -> None:
    worker = worker_processes(vhost.url, "--heartbeat-seconds", "60")
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.started" and e.subject == worker.name for e in evs),
        timeout=60)
    status = await anyio.run_process(
        [*_mq_worker(), "status", "--url", vhost.url, "--json"], check=False)
    assert status.returncode == 0, status.stderr
    assert [w["name"] for w in json.loads(status.stdout)["workers"]] == [worker.name]
    assert not [e.type for e in events.events if "ping" in e.type]


def _mq_worker() -> list[str]:
    from tests.helpers import PYTHON

    return [PYTHON, "-m", "mq_worker"]


# The role security.md gives `mq-worker status`: a subscriber that may also ping.
STATUS_PERMISSIONS = {
    "configure": r"^(mq_worker\.events|amq\.gen-.*)$",
    "write": r"^(amq\.gen-.*|mq_worker\.ping)$",
    "read": r"^(mq_worker\.events|amq\.gen-.*)$",
}


def test_the_documented_status_permissions_are_the_tested_ones() -> None:
    docs = Path(__file__).parent.parent / "docs" / "security.md"
    words = " ".join(docs.read_text().replace("\\\n", " ").split())
    quoted = " ".join(f"'{STATUS_PERMISSIONS[k]}'" for k in ("configure", "write", "read"))
    assert quoted in words


async def test_status_needs_no_write_permission_on_the_events_exchange(
    vhost: VHost, worker_processes: Any
) -> None:
    worker = worker_processes(vhost.url, "--heartbeat-seconds", "60")
    await wait_until(lambda: len(vhost.consumers("mq_worker.default.default")) == 1, timeout=60)
    user, password = f"status-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    management("PUT", f"/users/{user}", {"password": password, "tags": ""})
    try:
        management("PUT", f"/permissions/{urllib.parse.quote(vhost.name, safe='')}/{user}",
                   STATUS_PERMISSIONS)
        status = await anyio.run_process(
            [*_mq_worker(), "status", "--url", vhost.url_for(user, password), "--json"],
            check=False)
    finally:
        management("DELETE", f"/users/{user}")
    assert status.returncode == 0, status.stderr.decode()
    assert [w["name"] for w in json.loads(status.stdout)["workers"]] == [worker.name]


def sessions_of(vhost: VHost, worker: str) -> list[str]:
    """The worker's session connections (not the one its start-up replay may still hold)."""
    return [pid for pid, props in vhost.connections()
            if worker in props and "cancel replay" not in props]


async def test_malformed_worker_events_end_no_session_and_crash_no_status(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    reporter = worker_processes(vhost.url, "--heartbeat-seconds", "1")
    await wait_until(lambda: len(vhost.consumers("mq_worker.default.default")) == 1, timeout=60)
    connections_before = sessions_of(vhost, reporter.name)
    async with await anyio.open_process(
        [*_mq_worker(), "status", "--url", vhost.url, "--watch", "--json"]
    ) as watch:
        assert watch.stdout is not None
        with anyio.fail_after(30):
            first = await watch.stdout.receive()
        assert reporter.name.encode() in first
        for data in (
            {"heartbeat_seconds": "abc", "runs": [1, "x"], "in_flight": "nope"},
            {"heartbeat_seconds": -1, "runs": [{"id": "not-a-uuid"}]},
            {"heartbeat_seconds": 1e308, "queues": 7, "limit": "many"},
        ):
            forged = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/forged",
                      "type": "mq_worker.worker.heartbeat", "subject": "forged",
                      "time": "2026-11-29T00:00:00Z",
                      "data": {"worker": "forged", "pool": "default", **data}}
            # As a worker routes its heartbeats: to subscribers and to its pool's reporter.
            await publish_raw(vhost.url, forged, routing_key="mq_worker.worker.heartbeat",
                              exchange="mq_worker.events", headers={"BCC": ["workers.default"]})
        # The reporter keeps its session and still does its job.
        body = run_body(probe(tmp_path))
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]], timeout=30)
        assert events.terminal(body["id"])[0].type == "mq_worker.run.completed"
        assert sessions_of(vhost, reporter.name) \
            == connections_before, "the reporter's session ended"
        assert watch.returncode is None, "mq-worker status exited on a malformed heartbeat"
        # Refused, said so, and kept.
        rejected = await events.wait_for(lambda evs: [
            e for e in evs if e.type == "mq_worker.run.rejected"
            and e.data.get("message_kind") == "worker-event"], timeout=15)
        assert "heartbeat_seconds" in rejected[0].data["reason"]
        watch.terminate()
    await until_ready(vhost.url, {"mq_worker.dead": 1}, at_least=True)
    assert reporter.process.poll() is None


@pytest.mark.slow
@pytest.mark.timeout(1200)  # publishing 100,000 confirmed cancels takes minutes
async def test_workers_starting_behind_100k_cancels_serve_and_know_them(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    cancelled = [str(uuid.uuid4()) for _ in range(100_000)]
    await publish_cancels(vhost.url, cancelled)
    worker = worker_processes(vhost.url, "--heartbeat-seconds", "60")
    # How fast is for `benchmarks.scale --cancels`; here: it serves and knows every cancel.
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.started" and e.subject == worker.name for e in evs),
        timeout=300)
    first, last = run_body(probe(tmp_path)), run_body(probe(tmp_path))
    first["id"], last["id"] = cancelled[0], cancelled[-1]
    fresh = run_body(probe(tmp_path))
    for body in (first, last, fresh):
        await publish_raw(vhost.url, body)
    await events.wait_terminal([first["id"], last["id"], fresh["id"]], timeout=30)
    assert events.terminal(first["id"])[0].type == "mq_worker.run.cancelled"
    assert events.terminal(last["id"])[0].type == "mq_worker.run.cancelled"
    assert events.terminal(fresh["id"])[0].type == "mq_worker.run.completed"
    assert set(started_runs(tmp_path)) == {fresh["id"]}

    # A worker joining the pool starts from the snapshot the first one took of the window.
    snapshot = await _newest_snapshot(vhost, timeout=120)
    assert len(snapshot["run_ids"]) == 32 * len(cancelled)
    worker.signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(worker.wait) == 0
    joining = worker_processes(vhost.url, "--heartbeat-seconds", "60")
    await _started(events, joining, timeout=300)
    second, second_last = run_body(probe(tmp_path)), run_body(probe(tmp_path))
    second["id"], second_last["id"] = cancelled[1], cancelled[-2]
    fresh_again = run_body(probe(tmp_path))
    for body in (second, second_last, fresh_again):
        await publish_raw(vhost.url, body)
    await events.wait_terminal([second["id"], second_last["id"], fresh_again["id"]], timeout=30)
    assert events.terminal(second["id"])[0].type == "mq_worker.run.cancelled"
    assert events.terminal(second_last["id"])[0].type == "mq_worker.run.cancelled"
    assert events.terminal(fresh_again["id"])[0].type == "mq_worker.run.completed"
    assert set(started_runs(tmp_path)) == {fresh["id"], fresh_again["id"]}
    joining.signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(joining.wait) == 0


@pytest.mark.slow  # tests/test_cancel_replay.py covers joining from a snapshot in-process
async def test_a_joining_worker_starts_from_the_pools_snapshot_and_misses_no_cancel(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    # Enough for the first worker's replay to be worth a snapshot.
    early = [str(uuid.uuid4()) for _ in range(SNAPSHOT_EVERY)]
    await publish_cancels(vhost.url, early)
    first = worker_processes(vhost.url, "--heartbeat-seconds", "60")
    await _started(events, first)
    # Its pool's elected reporter, it snapshots the window it replayed for the next worker.
    snapshot = await _newest_snapshot(vhost)
    assert set(_ids_of(snapshot)) == {f"{uuid.UUID(r).int:032x}" for r in early}
    late = [str(uuid.uuid4()) for _ in range(2)]
    await publish_cancels(vhost.url, late)
    first.signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(first.wait) == 0

    joining = worker_processes(vhost.url, "--heartbeat-seconds", "60")
    await _started(events, joining)
    before, after, fresh = (run_body(probe(tmp_path)) for _ in range(3))
    before["id"], after["id"] = early[0], late[-1]
    for body in (before, after, fresh):
        await publish_raw(vhost.url, body)
    await events.wait_terminal([before["id"], after["id"], fresh["id"]], timeout=30)
    assert events.terminal(before["id"])[0].type == "mq_worker.run.cancelled"
    assert events.terminal(after["id"])[0].type == "mq_worker.run.cancelled"
    assert events.terminal(fresh["id"])[0].type == "mq_worker.run.completed"
    assert set(started_runs(tmp_path)) == {fresh["id"]}


async def _started(events: EventLog, worker: Any, timeout: float = 60) -> None:
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.started" and e.subject == worker.name for e in evs),
        timeout=timeout)


def _ids_of(snapshot: dict[str, Any]) -> list[str]:
    ids: str = snapshot["run_ids"]
    return [ids[i:i + 32] for i in range(0, len(ids), 32)]


async def _newest_snapshot(vhost: VHost, pool: str = "default", timeout: float = 30
                           ) -> dict[str, Any]:
    """The newest message of the pool's snapshot stream, decoded, once there is one."""
    name = f"mq_worker.cancel-snapshots-{pool}"
    # The reporter declares the stream when it publishes its first snapshot.
    await wait_until(lambda: queue_exists(vhost.url, name), timeout=timeout)
    connection = await aio_pika.connect(vhost.url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(name, ensure=False)
        bodies: list[bytes] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            bodies.append(message.body)
            await message.ack()

        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        await wait_until(lambda: bodies, timeout=timeout)
    value: dict[str, Any] = json.loads(bodies[-1])
    return value


async def publish_cancels(url: str, run_ids: list[str], pool: str = "default") -> None:
    """Publish one cancel per run id; return once the broker has confirmed the last."""
    from mq_worker.topology import QueueOptions, declare_cancel_stream, declare_exchanges

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        await declare_exchanges(raw)
        await declare_cancel_stream(raw, QueueOptions())
        for index, run_id in enumerate(run_ids):
            last = index == len(run_ids) - 1
            await raw.basic_publish(json.dumps({"id": run_id}).encode(), exchange=RUNS_EXCHANGE,
                                    routing_key=f"run.cancel.{pool}", wait=last)
