"""The event data functions against their models, and the reporter's events, without a broker."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from mq_worker import events
from mq_worker.events import CrashReason, EventType, MessageKind, OutgoingEvent
from mq_worker.fencing import worker_lost_event_id
from mq_worker.job_configuration import BaseJobConfiguration
from mq_worker.messages import RunMessage
from mq_worker.workers.reporter import Reporter, WorkerFacts
from mq_worker.workers.runs import ActiveRun, related

RUN = events.run_event_data(
    run_id=str(uuid.uuid4()), run_name="r", pool="p", queue="q", worker="w",
    related=[{"role": "work-pool", "id": None, "name": "p"}], tags=["t"], follows=None,
    attempt=1,
)
WORKER = events.worker_data(
    worker="w", pool="p", queues=["q"], type="process", limit=2, hostname="h", pid=1,
    version="1", heartbeat_seconds=5.0, follows=None, paused=[], run_events="outcomes",
)
NOW = datetime.now(UTC)

# Each data function called with every field it takes.
FULL: dict[type[BaseModel], dict[str, Any]] = {
    events.RunEventData: RUN,
    events.PendingData: events.pending_data(
        RUN, redelivered=False, delivery_count=0, scheduled_start_time=NOW, late_by_seconds=0.0,
        job_variables={"a": 1}, waiting_for="pool:p"),
    events.SubmittedData: events.submitted_data(RUN, infrastructure_pid="h:1",
                                                late_by_seconds=0.5, labels={"k": "v"}),
    events.CompletedData: events.completed_data(RUN, status_code=0, infrastructure_pid="h:1",
                                                duration_seconds=1.5),
    events.CrashedData: events.crashed_data(RUN, reason=CrashReason.EXIT_CODE, message="m",
                                            status_code=3, infrastructure_pid="h:1",
                                            reported_by="w2"),
    events.RetryingData: events.retrying_data(
        RUN, status_code=3, message="m", reason=CrashReason.TIMEOUT, infrastructure_pid="h:1",
        next_attempt=2, next_start_time=NOW, delay_seconds=1.0),
    events.CancelledData: events.cancelled_data(RUN, reason="asked", status_code=-15,
                                                infrastructure_pid="h:1", message="m"),
    events.RejectedData: events.rejected_data(RUN, reason="bad", message_kind=MessageKind.RUN),
    events.WorkerData: WORKER,
    events.HeartbeatData: events.heartbeat_data(
        WORKER, free_slots=1.0, outbox_depth=0,
        runs=[{"id": str(uuid.uuid4()), "name": "r", "queue": "q", "state": "running",
               "infrastructure_pid": "h:1", "attempt": 1}]),
    events.WorkerLostData: events.worker_lost_data(
        worker="w2", pool="p", last_seen=NOW.isoformat(), in_flight=[], reported_by="w"),
}


def test_every_event_model_has_one_data_function() -> None:
    models = set(events.DATA_MODELS.values()) | {events.RunEventData}
    assert set(events.DATA_BUILDERS) == models == set(FULL)


@pytest.mark.parametrize("model", list(FULL), ids=lambda m: m.__name__)
def test_a_data_function_writes_exactly_the_fields_of_its_model(model: type[BaseModel]) -> None:
    data = orjson.loads(orjson.dumps(FULL[model]))  # as a subscriber receives it
    assert set(data) == set(model.model_fields)
    model.model_validate(data)


class Collected(list[OutgoingEvent]):
    def bodies(self) -> list[dict[str, Any]]:
        return [orjson.loads(e.body) for e in self]


def reporter(*, start_events: bool = True) -> tuple[Reporter, Collected]:
    put = Collected()
    facts = WorkerFacts(worker="w", pool="p", queues=["q"], type="process", limit=2,
                        hostname="h", version="1", heartbeat_seconds=5.0, paused=lambda: [])
    return Reporter(facts, put.append, start_events=start_events), put


def active_run(**fields: Any) -> ActiveRun:
    run = RunMessage.model_validate({"id": str(uuid.uuid4()), "name": "r", "tags": ["t"],
                                     "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                                     **fields})
    delivery: Any = SimpleNamespace(redelivered=False, delivery_count=0)
    return ActiveRun(run=run, delivery=delivery, queue="q",
                     configuration=BaseJobConfiguration(), log=None,
                     related=related(run, "p", "q"))


def assert_valid(body: dict[str, Any]) -> None:
    model = events.DATA_MODELS[body["type"]]
    assert set(body["data"]) <= set(model.model_fields), body["type"]
    model.model_validate(body["data"])


@pytest.mark.anyio
async def test_a_run_s_events_follow_each_other_and_carry_its_trace() -> None:
    report, put = reporter()
    active = active_run()
    report.pending(active, late_by_seconds=0.0, job_variables={})
    active.infrastructure_pid = "h:1"
    report.submitted(active, late_by_seconds=0.1)
    report.ended(active, EventType.RUN_COMPLETED, status_code=0, infrastructure_pid="h:1",
                 duration_seconds=1.0)
    bodies = put.bodies()
    assert [b["type"] for b in bodies] == [EventType.RUN_PENDING, EventType.RUN_SUBMITTED,
                                          EventType.RUN_COMPLETED]
    assert [b["data"]["follows"] for b in bodies] == [None, bodies[0]["id"], bodies[1]["id"]]
    assert {b["subject"] for b in bodies} == {str(active.id)}
    assert {b["traceparent"] for b in bodies} == {active.run.traceparent}
    assert active.last_event_id == bodies[-1]["id"]
    for body in bodies:
        assert_valid(body)


@pytest.mark.anyio
async def test_without_start_events_a_run_reports_its_outcome_alone() -> None:
    report, put = reporter(start_events=False)
    active = active_run()
    report.pending(active, late_by_seconds=0.0, job_variables={})
    report.waiting(active.run, "q", active.delivery, "pool:p")
    active.infrastructure_pid = "h:1"
    report.submitted(active, late_by_seconds=0.1)
    report.retrying(active, status_code=1, message="exit 1", reason=CrashReason.EXIT_CODE,
                    next_start_time=datetime.now(UTC), delay_seconds=1.0)
    report.ended(active, EventType.RUN_CRASHED, status_code=1, reason=CrashReason.EXIT_CODE,
                 message="exit 1", infrastructure_pid="h:1")
    bodies = put.bodies()
    assert [b["type"] for b in bodies] == [EventType.RUN_RETRYING, EventType.RUN_CRASHED]
    assert [b["data"]["follows"] for b in bodies] == [None, bodies[0]["id"]]
    for body in bodies:
        assert_valid(body)


@pytest.mark.anyio
async def test_every_ending_a_run_can_have_is_a_valid_event() -> None:
    report, put = reporter()
    active = active_run()
    report.ended(active, EventType.RUN_CANCELLED, reason="asked")
    report.ended(active, EventType.RUN_CRASHED, reason=CrashReason.SUBMISSION_FAILED,
                 message="no such file", status_code=None)
    report.ended(active, EventType.RUN_CRASHED, reason=CrashReason.MONITORING_FAILED,
                 message="m", infrastructure_pid="h:1")
    report.retrying(active, status_code=3, message="m", reason=CrashReason.EXIT_CODE,
                    next_start_time=NOW, delay_seconds=1.0)
    report.cancelled_while_waiting(active.id, report.next_attempt_fields(active), "asked")
    report.cancelled_before_start(active.run, "q", "asked")
    report.waiting(active.run, "q", active.delivery, "pool:p")
    bodies = put.bodies()
    assert [b["data"]["attempt"] for b in bodies] == [1, 1, 1, 1, 2, 1, 1]
    assert bodies[2]["data"]["reason"] == "monitoring-failed"
    assert bodies[-1]["data"]["waiting_for"] == "pool:p"
    for body in bodies:
        assert_valid(body)


def test_a_rejected_cancel_names_no_run_or_queue() -> None:
    report, put = reporter()
    report.rejected(None, "invalid cancel: bad", None, kind=MessageKind.CANCEL)
    (body,) = put.bodies()
    assert "subject" not in body
    assert body["data"]["run_id"] is None and body["data"]["queue"] == ""
    assert body["data"]["message_kind"] == "cancel"
    assert_valid(body)


def test_worker_events_follow_the_one_started_event() -> None:
    report, put = reporter()
    report.worker_started()
    report.worker_started()  # a reconnection
    report.heartbeat([], free_slots=2.0, outbox_depth=0)
    report.worker_stopped()
    bodies = put.bodies()
    assert [b["type"] for b in bodies] == [EventType.WORKER_STARTED, EventType.WORKER_HEARTBEAT,
                                          EventType.WORKER_STOPPED]
    assert [b["data"]["follows"] for b in bodies] == [None, bodies[0]["id"], bodies[0]["id"]]
    assert all(e.also_routed_to == ("workers.p",) for e in put)
    for body in bodies:
        assert_valid(body)


@pytest.mark.anyio
async def test_a_fenced_run_ends_with_the_event_a_peer_would_publish() -> None:
    report, put = reporter()
    active = active_run()
    active.infrastructure_pid = "h:1"
    own = report.fenced_ending(active, -9)
    peer: Any = SimpleNamespace(name="w", pool="p", last_seen=time.monotonic(), runs=[
        {"id": str(active.id), "state": "running", "infrastructure_pid": "h:1"}])
    other, reported = reporter()
    other.worker_lost(peer, peer.runs)
    assert [e.type for e in reported] == [EventType.WORKER_LOST, EventType.RUN_CRASHED]
    assert own.id == reported[1].id == worker_lost_event_id("w", str(active.id), "h:1")
    assert list(put) == []  # built, not yet published
    for body in reported.bodies():
        assert_valid(body)
    crashed = orjson.loads(own.body)
    assert crashed["data"]["reason"] == "worker-lost" and crashed["data"]["reported_by"] == "w"
    assert_valid(crashed)


def test_a_field_not_given_is_left_out_and_one_given_as_null_is_kept() -> None:
    # What subscribers saw before the reporter existed: a run cancelled before it started
    # has no exit status at all; one that could not be started has a null one.
    cancelled_before_start = events.cancelled_data(RUN, reason="asked")
    assert set(cancelled_before_start) == {*RUN, "reason"}
    not_started = events.crashed_data(RUN, reason=CrashReason.SUBMISSION_FAILED, message="m",
                                      status_code=None)
    assert set(not_started) - set(RUN) == {"status_code", "reason", "message"}
    assert not_started["status_code"] is None
    lost_by_peer = events.crashed_data(RUN, reason=CrashReason.WORKER_LOST, message="m",
                                       infrastructure_pid="h:1", reported_by="w2")
    assert "status_code" not in lost_by_peer
    assert lost_by_peer["infrastructure_pid"] == "h:1"
