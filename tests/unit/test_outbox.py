"""The outbox hands a run's unconfirmed ending over to the worker-lost report (no broker)."""

from __future__ import annotations

from pathlib import Path

from mq_worker.events import EventType, OutgoingEvent, build_event
from mq_worker.fencing import worker_lost_event_id
from mq_worker.outbox import Outbox
from mq_worker.spool import Spool

RUN = "0b7a1c52-9a8e-4a59-8c0e-3d1c8f0f7a11"
OTHER = "5d6c2e14-1f0b-4b0e-9a55-7e2a9c3b8d22"


def _run_event(event_type: str, run_id: str, **data: object) -> OutgoingEvent:
    return build_event(event_type, source="test", subject=run_id,
                       data={"run_id": run_id, **data})


def _worker_lost(run_id: str) -> OutgoingEvent:
    return build_event(EventType.RUN_CRASHED, source="test", subject=run_id,
                       event_id=worker_lost_event_id("w1", run_id, "host:42"),
                       data={"run_id": run_id, "reason": "worker-lost"})


def _queued(tmp_path: Path) -> tuple[Outbox, list[OutgoingEvent]]:
    outbox = Outbox(spool=Spool(tmp_path / "w1.outbox.jsonl"))
    events = [
        _run_event(EventType.RUN_SUBMITTED, RUN),
        _run_event(EventType.RUN_COMPLETED, RUN, status_code=0),
        _run_event(EventType.RUN_COMPLETED, OTHER, status_code=0),
    ]
    for event in events:
        outbox.put(event)
    return outbox, events


def test_an_unconfirmed_ending_is_replaced_in_place_in_memory_and_spool(tmp_path: Path) -> None:
    outbox, (submitted, completed, other) = _queued(tmp_path)
    lost = _worker_lost(RUN)

    assert outbox.pending_terminal(RUN) == completed
    assert outbox.replace_unconfirmed(RUN, lost)

    assert outbox.pending_terminal(RUN) == lost
    restored = Spool(tmp_path / "w1.outbox.jsonl").load()
    assert [(e.id, e.type) for e in restored] == [
        (submitted.id, EventType.RUN_SUBMITTED),
        (lost.id, EventType.RUN_CRASHED),
        (other.id, EventType.RUN_COMPLETED),
    ]
    assert len(outbox) == 3
    outbox.close()


def test_an_unconfirmed_ending_is_dropped_when_a_peer_reported_the_run(tmp_path: Path) -> None:
    outbox, (submitted, _completed, other) = _queued(tmp_path)

    assert outbox.replace_unconfirmed(RUN, _worker_lost(RUN), drop=True)

    assert outbox.pending_terminal(RUN) is None
    restored = Spool(tmp_path / "w1.outbox.jsonl").load()
    assert [e.id for e in restored] == [submitted.id, other.id]
    assert len(outbox) == 2
    outbox.close()


def test_a_run_without_an_unconfirmed_ending_is_left_alone(tmp_path: Path) -> None:
    outbox = Outbox(spool=Spool(tmp_path / "w1.outbox.jsonl"))
    submitted = _run_event(EventType.RUN_SUBMITTED, RUN)
    rejected_cancel = _run_event(EventType.RUN_REJECTED, RUN, message_kind="cancel")
    outbox.put(submitted)
    outbox.put(rejected_cancel)

    assert not outbox.replace_unconfirmed(RUN, _worker_lost(RUN))
    assert not outbox.replace_unconfirmed(RUN, _worker_lost(RUN), drop=True)

    assert [e.id for e in Spool(tmp_path / "w1.outbox.jsonl").load()] == [
        submitted.id, rejected_cancel.id]
    outbox.close()
