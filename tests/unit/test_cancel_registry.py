"""The cancel registry: what it remembers, what it forgets, and what that costs in memory."""

from __future__ import annotations

import gc
import time
import tracemalloc
import uuid

from mq_worker.cancellation import CancelRecord, CancelRegistry


def test_a_cancel_is_remembered_once_with_its_reason() -> None:
    registry = CancelRegistry()
    run_id = uuid.uuid4()
    assert registry.add(CancelRecord(run_id, "operator", time.time()))
    assert not registry.add(CancelRecord(run_id, None, time.time()))
    record = registry.get(run_id)
    assert record is not None
    assert (record.run_id, record.reason, record.reported) == (run_id, "operator", False)
    assert registry.get(uuid.uuid4()) is None


def test_marking_reported_keeps_the_reason() -> None:
    registry = CancelRegistry()
    run_id, unknown = uuid.uuid4(), uuid.uuid4()
    registry.add(CancelRecord(run_id, "why", time.time()))
    registry.mark_reported(run_id)
    registry.mark_reported(unknown)
    record = registry.get(run_id)
    assert record is not None and record.reported and record.reason == "why"
    assert registry.get(unknown) is None


def test_cancels_older_than_the_window_are_forgotten() -> None:
    registry = CancelRegistry(window_seconds=60)
    now = time.time()
    old, recent = uuid.uuid4(), uuid.uuid4()
    registry.add(CancelRecord(old, "x", now - 120))
    registry.add(CancelRecord(recent, None, now))
    assert registry.get(old) is None
    assert registry.get(recent) is not None
    assert len(registry) == 1


def test_a_full_registry_forgets_its_oldest_cancel() -> None:
    registry = CancelRegistry(max_entries=3)
    ids = [uuid.uuid4() for _ in range(5)]
    for run_id in ids:
        registry.add(CancelRecord(run_id, None, time.time()))
    assert [registry.get(r) is not None for r in ids] == [False, False, True, True, True]
    assert [r.run_id for r in registry.records()] == ids[2:]


def test_100k_cancels_take_less_than_16_mib() -> None:
    ids = [str(uuid.uuid4()) for _ in range(100_000)]
    at = float(int(time.time()))
    gc.collect()
    tracemalloc.start()
    try:
        registry = CancelRegistry()
        for index, run_id in enumerate(ids):
            # As a replay reads them: ids parsed from text, whole-second broker timestamps.
            registry.add(CancelRecord(uuid.UUID(run_id), None, at + index // 10_000))
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(registry) == 100_000
    print(f"registry of 100,000 cancels: {used / 2**20:.1f} MiB")
    assert used < 16 * 2**20, used
