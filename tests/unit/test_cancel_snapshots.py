"""Snapshots of the cancel window, encoded and decoded without a broker."""

from __future__ import annotations

import time
import uuid

import orjson

from mq_worker.cancel_snapshots import SCHEMA_VERSION, decode, decode_part, encode
from mq_worker.cancellation import CancelRecord, CancelRegistry


def _registry() -> tuple[CancelRegistry, list[uuid.UUID]]:
    registry = CancelRegistry(window_seconds=3600)
    ids = [uuid.uuid4() for _ in range(5)]
    now = time.time()
    for position, run_id in enumerate(ids):
        registry.add(CancelRecord(run_id, "operator" if position == 1 else None, now))
    registry.mark_reported(ids[3])
    return registry, ids


def test_a_snapshot_restores_every_cancel_with_its_reason_and_reported_flag() -> None:
    registry, ids = _registry()
    [body] = encode(registry, pool="etl", next_offset=42, last_message="")
    snapshot = decode([body], pool="etl", window_seconds=3600)
    assert snapshot is not None and snapshot.next_offset == 42
    restored = CancelRegistry(window_seconds=3600)
    assert restored.restore(snapshot.rows()) == 5
    assert [r.run_id for r in restored.records()] == ids
    assert [(r.reason, r.reported) for r in restored.records()] == [
        (None, False), ("operator", False), (None, False), (None, True), (None, False)]


def test_a_snapshot_another_worker_cannot_use_is_ignored() -> None:
    registry, _ = _registry()
    [body] = encode(registry, pool="etl", next_offset=42, last_message="")
    assert decode([body], pool="other", window_seconds=3600) is None
    assert decode([body], pool="etl", window_seconds=7200) is None  # older cancels may be missing
    value = orjson.loads(body)
    for broken in ({**value, "schema_version": SCHEMA_VERSION + 1},
                   {**value, "run_ids": value["run_ids"][:-1]},
                   {**value, "run_ids": "g" * len(value["run_ids"])},
                   {**value, "notes": {"not-hex": {"reason": None}}},
                   {**value, "at": [*value["at"][:-1], "soon"]},
                   {**value, "next_offset": -1},
                   {**value, "part": 1},
                   {key: v for key, v in value.items() if key != "last_message"}):
        assert decode([orjson.dumps(broken)], pool="etl", window_seconds=3600) is None
    assert decode([b"not json"], pool="etl", window_seconds=3600) is None


def test_restoring_skips_cancels_already_held_or_out_of_the_window() -> None:
    registry, ids = _registry()
    snapshot = decode(encode(registry, pool="etl", next_offset=1, last_message="ab"),
                      pool="etl", window_seconds=60)
    assert snapshot is not None
    restored = CancelRegistry(window_seconds=60)
    restored.add(CancelRecord(ids[0], None, time.time()))
    assert restored.restore(snapshot.rows()) == 4
    assert restored.restore(snapshot.rows(), now=time.time() + 3600) == 0


def test_a_snapshot_in_parts_is_used_only_when_every_part_of_it_is_read() -> None:
    registry, ids = _registry()
    parts = encode(registry, pool="etl", next_offset=42, last_message="ab", part_cancels=2)
    assert len(parts) == 3
    # In any order the parts restore the whole window, oldest first.
    snapshot = decode(parts[::-1], pool="etl", window_seconds=3600)
    assert snapshot is not None and snapshot.next_offset == 42
    assert snapshot.last_message == "ab"
    restored = CancelRegistry(window_seconds=3600)
    assert restored.restore(snapshot.rows()) == 5
    assert [r.run_id for r in restored.records()] == ids
    assert [(r.reason, r.reported) for r in restored.records()] == [
        (None, False), ("operator", False), (None, False), (None, True), (None, False)]
    # A part missing, twice the same part, or a part of another snapshot: not used.
    other = encode(registry, pool="etl", next_offset=42, last_message="ab", part_cancels=2)
    for incomplete in (parts[:2], [parts[0], parts[1], parts[1]], [parts[0], parts[1],
                                                                    other[2]]):
        assert decode(incomplete, pool="etl", window_seconds=3600) is None


def test_an_empty_window_is_one_part_and_a_reader_of_version_1_ignores_parts() -> None:
    [body] = encode(CancelRegistry(), pool="etl", next_offset=0, last_message="")
    snapshot = decode([body], pool="etl", window_seconds=3600)
    assert snapshot is not None and list(snapshot.rows()) == []
    # Version 1 readers required schema_version 1: a part is not mistaken for a whole.
    assert orjson.loads(body)["schema_version"] == SCHEMA_VERSION == 2
    assert decode_part(orjson.dumps({**orjson.loads(body), "schema_version": 1}), pool="etl",
                       window_seconds=3600) is None
