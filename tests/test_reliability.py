"""Faults on a real broker: killed workers, lost connections, deleted queues, poison messages."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import aio_pika
import anyio
import psutil
import pytest

from mq_worker.events import Event
from mq_worker.job_configuration import BaseJobConfiguration
from mq_worker.topology import DEAD_QUEUE
from mq_worker.workers.process import ProcessWorker
from tests.helpers import (
    HOST,
    PORT,
    EventLog,
    VHost,
    consumer_count,
    management,
    probe,
    publish_raw,
    ready_counts,
    run_body,
    running_worker,
    started_runs,
    unique,
    until_no_run_left,
    wait_until,
    worker_settings,
)
from tests.proxy import link_proxy

pytestmark = pytest.mark.anyio

WORK_QUEUE = "mq_worker.default.default"


def in_order(events: list[Event]) -> list[str]:
    """Event types in order of first appearance, duplicates (same id) removed."""
    return [event.type.removeprefix("mq_worker.") for event in unique(events)]


def _soon(seconds: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(time.time() + seconds, UTC).isoformat()


async def ready_in_work_queue(url: str) -> int:
    """Messages ready in the work queue now, by a passive declare (rabbitmqctl takes a
    second or so and shows a quorum queue's count late); unacknowledged ones are not
    counted until their consumer is gone."""
    return (await ready_counts(url, [WORK_QUEUE]))[WORK_QUEUE]


async def until_ready_in_work_queue(url: str, count: int, timeout: float = 15) -> None:
    with anyio.fail_after(timeout):
        while True:
            if await ready_in_work_queue(url) == count:
                return
            await anyio.sleep(0.05)


async def started_event(events: EventLog, name: str) -> Event:
    found = await events.wait_for(
        lambda evs: [e for e in evs if e.type == "mq_worker.worker.started" and e.subject == name],
        timeout=30)
    return found[0]


async def test_killed_worker_loses_no_unstarted_run(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    first = worker_processes(vhost.url, "--limit", "8", "--prefetch-seconds", "30")
    await started_event(events, first.name)
    # Due in 10 s: still held, a moment after they are taken, when the first worker dies
    # (publishing them and hearing of all five can take seconds on a loaded machine).
    held = [run_body(probe(tmp_path), scheduled_start_time=_soon(10)) for _ in range(5)]
    for body in held:
        await publish_raw(vhost.url, body)
    await events.wait_for(lambda _: all("run.pending" in events.types(b["id"]) for b in held))
    first.kill()  # SIGKILL while it holds five runs it has not started

    second = worker_processes(vhost.url, "--limit", "8", "--prefetch-seconds", "30")
    await started_event(events, second.name)
    await events.wait_terminal([b["id"] for b in held], timeout=30)

    assert set(started_runs(tmp_path)) == {b["id"] for b in held}
    for body in held:
        terminal = events.terminal(body["id"])
        assert [e.type for e in terminal] == ["mq_worker.run.completed"]
        assert terminal[0].data["worker"] == second.name
        retaken = [e for e in events.of(body["id"])
                   if e.type == "mq_worker.run.pending" and e.data["worker"] == second.name]
        assert retaken and retaken[0].data["redelivered"] is True


async def test_lost_worker_is_reported_once_and_its_runs_are_terminated(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    doomed = worker_processes(vhost.url, "--heartbeat-seconds", "1", "--limit", "2")
    peers = [worker_processes(vhost.url, "--heartbeat-seconds", "1", "--limit", "1")
             for _ in range(2)]
    for worker in (doomed, *peers):
        await started_event(events, worker.name)
    # Occupy the peers so the doomed worker gets the two long runs.
    blockers = [run_body(probe(tmp_path, sleep=60)) for _ in range(2)]
    victims = [run_body(probe(tmp_path, sleep=60)) for _ in range(2)]
    for body in blockers + victims:
        await publish_raw(vhost.url, body)
    await wait_until(lambda: len(started_runs(tmp_path)) == 4, timeout=30)
    # A process can start before its `submitted` event reaches this subscriber.
    await events.wait_for(lambda _: all("run.submitted" in events.types(b["id"])
                                        for b in blockers + victims))
    on_doomed = [b["id"] for b in blockers + victims
                 if any(e.type == "mq_worker.run.submitted" and e.data["worker"] == doomed.name
                        for e in events.of(b["id"]))]
    assert len(on_doomed) == 2
    # The doomed worker's last heartbeat lists its runs.
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.heartbeat" and e.subject == doomed.name
        and set(e.data["in_flight"]) == set(on_doomed) for e in evs))
    pids = [started_runs(tmp_path)[r]["pid"] for r in on_doomed]

    doomed.kill()
    # The guardian terminates the dead worker's runs: no orphan runs on unsupervised.
    await wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                                     != psutil.STATUS_ZOMBIE for p in pids), timeout=15)
    lost = await events.wait_for(lambda evs: [
        e for e in evs if e.type == "mq_worker.worker.lost" and e.subject == doomed.name],
        timeout=20)
    await events.wait_terminal(on_doomed, timeout=10)
    for run_id in on_doomed:
        terminal = events.terminal(run_id)
        assert len(terminal) == 1
        assert terminal[0].type == "mq_worker.run.crashed"
        assert terminal[0].data["reason"] == "worker-lost"
        assert terminal[0].data["worker"] == doomed.name
    reporters = {e.data["reported_by"] for e in lost}
    assert len(lost) == 1 and reporters <= {p.name for p in peers}


async def test_sigterm_gives_back_queued_runs_to_a_peer(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    first = worker_processes(vhost.url, "--limit", "1", "--prefetch-seconds", "30")
    await started_event(events, first.name)
    running = run_body(probe(tmp_path, sleep=3))
    # Due in 10 s: held when the first worker is stopped a moment after taking it (four
    # more runs published first), and started, when due, by the peer it was given back to.
    held = run_body(probe(tmp_path), scheduled_start_time=_soon(10))
    queued = [run_body(probe(tmp_path)) for _ in range(3)]
    await publish_raw(vhost.url, held)
    await events.wait_for(lambda _: "run.pending" in events.types(held["id"]))
    await publish_raw(vhost.url, running)
    for body in queued:
        await publish_raw(vhost.url, body)

    first.signal(signal.SIGTERM)
    second = worker_processes(vhost.url, "--limit", "4", "--prefetch-seconds", "30")
    await events.wait_terminal([b["id"] for b in [held, *queued]], timeout=30)
    assert await anyio.to_thread.run_sync(first.wait) == 0
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.stopped" and e.subject == first.name for e in evs))
    for body in [held, *queued]:
        assert events.terminal(body["id"])[0].data["worker"] == second.name
    if events.terminal(running["id"]):
        assert events.terminal(running["id"])[0].type == "mq_worker.run.completed"


async def test_drain_timeout_cancels_runs_still_running(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    worker = worker_processes(vhost.url, "--drain-timeout", "1")
    await started_event(events, worker.name)
    body = run_body(probe(tmp_path, sleep=120))
    await publish_raw(vhost.url, body)
    await wait_until(lambda: body["id"] in started_runs(tmp_path))
    began = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(worker.wait) == 0
    assert time.monotonic() - began < 15
    terminal = await events.wait_for(lambda _: events.terminal(body["id"]))
    assert terminal[0].type == "mq_worker.run.cancelled"
    assert "drain timeout" in terminal[0].data["reason"]


async def test_second_signal_stops_at_once_and_settles_everything(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    worker = worker_processes(vhost.url, "--limit", "3", "--prefetch-seconds", "60")
    await started_event(events, worker.name)
    long_runs = [run_body(probe(tmp_path, sleep=120)) for _ in range(2)]
    held = run_body(probe(tmp_path), scheduled_start_time=_soon(40))
    for body in long_runs:
        await publish_raw(vhost.url, body)
    await publish_raw(vhost.url, held)
    await wait_until(lambda: len(started_runs(tmp_path)) == 2)
    await events.wait_for(lambda _: "run.pending" in events.types(held["id"]))
    worker.signal(signal.SIGINT)
    # The first signal gave back the held run; the second stops the running ones.
    await until_ready_in_work_queue(vhost.url, 1)
    worker.signal(signal.SIGINT)
    assert await anyio.to_thread.run_sync(lambda: worker.wait(30)) == 0
    await events.wait_terminal([b["id"] for b in long_runs])
    for body in long_runs:
        assert events.terminal(body["id"])[0].type == "mq_worker.run.cancelled"
    # The worker is gone: a run it had not acknowledged would be back in the queue.
    assert await ready_in_work_queue(vhost.url) == 1


async def test_connection_closed_by_the_broker_loses_no_event(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    bodies = [run_body(probe(tmp_path, sleep=2)) for _ in range(4)]
    async with running_worker(vhost.url, limit=4) as worker:
        for body in bodies:
            await publish_raw(vhost.url, body)
        await wait_until(lambda: len(started_runs(tmp_path)) == 4)
        assert vhost.close_connections(worker.name) >= 1
        await events.wait_terminal([b["id"] for b in bodies], timeout=30)
        # Consumers are back after the reconnection, as the broker has them.
        with anyio.fail_after(15):
            while True:
                if await consumer_count(vhost.url, WORK_QUEUE):
                    break
                await anyio.sleep(0.05)
        after = run_body(probe(tmp_path))
        await publish_raw(vhost.url, after)
        await events.wait_terminal([after["id"]])
    for body in bodies:
        assert in_order(events.of(body["id"])) == ["run.pending", "run.submitted",
                                                    "run.completed"]
    assert len(started_runs(tmp_path)) == 5


async def test_link_cut_by_a_proxy_events_wait_and_flow_in_order(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    # The runs end once the link is cut, however long the last of them took to start.
    gate = tmp_path / "cut"
    bodies = [run_body(probe(tmp_path, extra=f"--gate {gate}")) for _ in range(4)]
    async with link_proxy(HOST, PORT) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        async with running_worker(url, limit=4) as worker:
            for body in bodies:
                await publish_raw(vhost.url, body)
            await wait_until(lambda: len(started_runs(tmp_path)) == 4)
            proxy.cut()
            gate.touch()
            # The runs finish while the worker cannot reach the broker.
            await wait_until(lambda: not worker.in_flight, timeout=15)
            assert not worker.connected
            healthy, reason = worker.health()
            assert not healthy and "connected" in reason
            assert not any(events.terminal(b["id"]) for b in bodies)
            await proxy.restore()
            await events.wait_terminal([b["id"] for b in bodies], timeout=30)
            await wait_until(lambda: worker.health() == (True, "consuming"), timeout=10)
    for body in bodies:
        assert in_order(events.of(body["id"])) == ["run.pending", "run.submitted",
                                                    "run.completed"]


async def test_full_outbox_stops_intake_until_it_drains(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    bodies = [run_body(probe(tmp_path, sleep=0.5)) for _ in range(4)]
    async with link_proxy(HOST, PORT) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        async with running_worker(url, limit=4, outbox_size=10) as worker:
            for body in bodies:
                await publish_raw(vhost.url, body)
            await wait_until(lambda: len(started_runs(tmp_path)) == 4)
            proxy.cut()
            await wait_until(lambda: not worker.in_flight, timeout=15)
            # Twelve run events (plus heartbeats) wait: more than the outbox's ten.
            assert worker.health() == (False, "not connected to the broker (reconnecting)")
            await proxy.restore()
            await events.wait_terminal([b["id"] for b in bodies], timeout=30)
            await wait_until(lambda: worker.health()[0], timeout=10)
            after = run_body(probe(tmp_path))
            await publish_raw(vhost.url, after)
            await events.wait_terminal([after["id"]])


async def test_outbox_spool_survives_a_worker_restart(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    runs = tmp_path / "runs"
    runs.mkdir()
    gate = tmp_path / "cut"  # the run ends once the link is cut, never before
    body = run_body(probe(runs, extra=f"--gate {gate}"))
    async with link_proxy(HOST, PORT) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        worker = worker_processes(url, "--spool-dir", str(spool), name="spooler")
        await started_event(events, "spooler")
        await publish_raw(vhost.url, body)
        await wait_until(lambda: body["id"] in started_runs(runs))
        proxy.cut()
        gate.touch()
        await wait_until(lambda: (runs / f"{body['id']}.end").exists())
        # The completed event can only be in the spool now; kill the worker.
        await wait_until(lambda: "run.completed" in (spool / "spooler.outbox.jsonl").read_text()
                         if (spool / "spooler.outbox.jsonl").exists() else False, timeout=10)
        worker.kill()
        await proxy.restore()
    worker_processes(vhost.url, "--spool-dir", str(spool), name="spooler")
    await events.wait_terminal([body["id"]], timeout=30)
    assert in_order(events.of(body["id"])) == ["run.pending", "run.submitted", "run.completed"]


async def test_deleted_queue_declared_again_is_consumed_again(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    async with running_worker(vhost.url):
        await wait_until(lambda: vhost.consumers("mq_worker.default.default"))
        management("DELETE", f"/queues/{vhost.name}/mq_worker.default.default")
        await wait_until(lambda: vhost.consumers("mq_worker.default.default"), timeout=15)
        body = run_body(probe(tmp_path))
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]])
    assert events.types(body["id"]) == ["run.pending", "run.submitted", "run.completed"]


async def test_failed_ack_is_recognised_by_run_id_on_redelivery(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    # At full capacity the worker defers the acknowledgement of a started run
    # (here up to 60 s); losing the connection then makes the broker redeliver it.
    body = run_body(probe(tmp_path, sleep=4))
    async with running_worker(vhost.url, limit=1, ack_grace=60) as worker:
        await publish_raw(vhost.url, body)
        await wait_until(lambda: body["id"] in started_runs(tmp_path))
        assert vhost.close_connections(worker.name) >= 1
        await events.wait_terminal([body["id"]], timeout=30)
        await until_no_run_left(vhost.url, [WORK_QUEUE], worker, timeout=15)
    # The worker is gone: had it not acknowledged the redelivery, it would be back.
    assert await ready_in_work_queue(vhost.url) == 0
    assert len(started_runs(tmp_path)) == 1
    assert in_order(events.of(body["id"])) == ["run.pending", "run.submitted", "run.completed"]


class _Poisoned(ProcessWorker):
    """A worker type with a bug: a certain command makes it fail unexpectedly."""

    def check_configuration(self, configuration: BaseJobConfiguration) -> None:
        if configuration.command == "poison":
            raise RuntimeError("a bug triggered by this message")
        super().check_configuration(configuration)


async def test_poison_message_is_dead_lettered_after_the_delivery_limit(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    poison = run_body("poison")
    good = run_body(probe(tmp_path))
    worker = _Poisoned(worker_settings(vhost.url, delivery_limit=3))
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.serve)
        await worker.ready.wait()
        await publish_raw(vhost.url, poison)
        await publish_raw(vhost.url, good)
        await events.wait_terminal([good["id"]])
        connection = await aio_pika.connect(vhost.url)
        async with connection:
            channel = await connection.channel()
            dead = await channel.declare_queue(DEAD_QUEUE, passive=True)

            with anyio.fail_after(15):
                async with dead.iterator() as messages:
                    message = await anext(messages)
            assert json.loads(message.body)["id"] == poison["id"]
            deaths = message.headers["x-death"]
            assert deaths[0]["reason"] == "delivery_limit"
            await message.ack()
        assert worker.free_slots == 4
        worker.stop()
    assert events.types(good["id"])[-1] == "run.completed"


async def test_no_slot_leaks_after_every_kind_of_outcome(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    completed = run_body(probe(tmp_path))
    crashed = run_body(probe(tmp_path, exit_code=5))
    failed = run_body("/no/such/binary")
    cancelled = run_body(probe(tmp_path, sleep=60))
    rejected = run_body("true", job_variables={"command": "true", "nope": 1})
    async with running_worker(vhost.url, limit=3) as worker:
        for body in (completed, crashed, failed, cancelled, rejected):
            await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: "run.submitted" in events.types(cancelled["id"]))
        await publish_raw(vhost.url, {"id": cancelled["id"]}, routing_key="run.cancel.default")
        await events.wait_terminal([b["id"] for b in (completed, crashed, failed, cancelled,
                                                       rejected)])
        await wait_until(lambda: worker.free_slots == 3 and not worker.in_flight)

