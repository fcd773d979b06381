"""The cancel registry without a broker: what a worker remembers of the cancel stream."""

from __future__ import annotations

import time
import uuid

from mq_worker.cancellation import CancelRecord, CancelRegistry


def _cancel(at: float | None = None, reason: str | None = "by the operator") -> CancelRecord:
    return CancelRecord(uuid.uuid4(), reason, time.time() if at is None else at)


def test_a_run_is_cancelled_once_and_its_first_cancel_is_kept() -> None:
    registry = CancelRegistry()
    first = _cancel(reason="first")
    again = CancelRecord(first.run_id, "second", first.at + 1)

    assert registry.add(first)
    assert not registry.add(again)

    assert registry.get(first.run_id) == first
    assert len(registry) == 1


def test_a_run_never_cancelled_is_not_in_the_registry() -> None:
    registry = CancelRegistry()
    registry.add(_cancel())

    assert registry.get(uuid.uuid4()) is None


def test_cancels_older_than_the_window_are_forgotten() -> None:
    registry = CancelRegistry(window_seconds=60)
    old = _cancel(at=time.time() - 120)
    recent = _cancel(at=time.time() - 30)

    registry.add(old)
    registry.add(recent)

    assert registry.get(old.run_id) is None
    assert registry.get(recent.run_id) == recent


def test_a_full_registry_forgets_its_oldest_cancels_first() -> None:
    registry = CancelRegistry(max_entries=3)
    cancels = [_cancel() for _ in range(5)]

    for cancel in cancels:
        registry.add(cancel)

    assert len(registry) == 3
    assert [registry.get(c.run_id) for c in cancels] == [None, None, *cancels[2:]]


def test_a_reported_cancel_is_marked_and_an_unknown_one_ignored() -> None:
    registry = CancelRegistry()
    cancel = _cancel()
    registry.add(cancel)

    registry.mark_reported(cancel.run_id)
    registry.mark_reported(uuid.uuid4())

    marked = registry.get(cancel.run_id)
    assert marked is not None and marked.reported
    assert (marked.reason, marked.at) == (cancel.reason, cancel.at)
    assert len(registry) == 1
