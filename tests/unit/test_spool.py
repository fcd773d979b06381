"""The outbox spool without a broker: what survives a restart, torn and unreadable lines,
who may read the file, and adopting the spools of workers that are gone."""

from __future__ import annotations

import stat
from pathlib import Path

from mq_worker.events import EventType, OutgoingEvent, build_event
from mq_worker.spool import SUFFIX, Spool, open_spool

RUN = "0b7a1c52-9a8e-4a59-8c0e-3d1c8f0f7a11"


def _event(event_type: str = EventType.RUN_SUBMITTED) -> OutgoingEvent:
    return build_event(event_type, source="test", subject=RUN, data={"run_id": RUN})


def _ids(events: list[OutgoingEvent]) -> list[str]:
    return [event.id for event in events]


def test_appended_events_come_back_in_order_with_their_routing(tmp_path: Path) -> None:
    path = tmp_path / f"w1{SUFFIX}"
    spool = Spool(path)
    heartbeat = build_event(EventType.WORKER_HEARTBEAT, source="test", subject="w1",
                            data={"worker": "w1", "pool": "etl"})
    written = [_event(), _event(EventType.RUN_COMPLETED), heartbeat]
    spool.append(written[0])
    spool.append_all(written[1:])
    spool.close()

    restored = Spool(path).load()

    assert restored == written
    assert restored[2].also_routed_to == ("workers.etl",)


def test_the_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / f"w1{SUFFIX}"
    path.write_bytes(b"")
    path.chmod(0o644)

    Spool(path).close()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_line_torn_by_a_crash_is_cut_and_later_events_stay_readable(tmp_path: Path) -> None:
    path = tmp_path / f"w1{SUFFIX}"
    first = _event()
    spool = Spool(path)
    spool.append(first)
    spool.close()
    with path.open("ab") as file:
        file.write(b'{"id": "half of a line')

    spool = Spool(path)
    later = _event(EventType.RUN_COMPLETED)
    spool.append(later)
    spool.close()

    assert _ids(Spool(path).load()) == [first.id, later.id]


def test_an_unreadable_line_is_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / f"w1{SUFFIX}"
    before, after = _event(), _event(EventType.RUN_COMPLETED)
    spool = Spool(path)
    spool.append(before)
    spool._file.write(b'{"not": "an event record"}\n')
    spool.append(after)
    spool.close()

    assert _ids(Spool(path).load()) == [before.id, after.id]


def test_the_file_empties_when_every_event_is_confirmed(tmp_path: Path) -> None:
    path = tmp_path / f"w1{SUFFIX}"
    spool = Spool(path)
    events = [_event(), _event(EventType.RUN_COMPLETED)]
    spool.append_all(events)

    spool.confirmed(1, events[1:])
    assert _ids(Spool(path).load())[-1:] == [events[1].id]
    spool.confirmed(1, [])
    spool.close()

    assert path.stat().st_size == 0


def test_a_rewrite_keeps_exactly_the_pending_events(tmp_path: Path) -> None:
    path = tmp_path / f"w1{SUFFIX}"
    spool = Spool(path)
    events = [_event(), _event(), _event(EventType.RUN_COMPLETED)]
    spool.append_all(events)

    spool.rewrite(events[2:])
    extra = _event()
    spool.append(extra)
    spool.close()

    assert _ids(Spool(path).load()) == [events[2].id, extra.id]


def test_a_worker_with_the_default_name_finds_its_file_again_after_a_restart(
        tmp_path: Path) -> None:
    before_restart = open_spool(tmp_path, "host-1234", default_name=True)
    pending = _event()
    before_restart.append(pending)
    before_restart.close()

    after_restart = open_spool(tmp_path, "host-5678", default_name=True)

    assert after_restart.path == tmp_path / f"host{SUFFIX}"
    assert _ids(after_restart.load()) == [pending.id]
    after_restart.close()


def test_two_live_workers_never_share_a_file(tmp_path: Path) -> None:
    first = open_spool(tmp_path, "host-1", default_name=True)
    second = open_spool(tmp_path, "host-2", default_name=True)

    assert first.path != second.path
    assert second.path == tmp_path / f"host.2{SUFFIX}"
    first.close()
    second.close()


def test_the_events_of_a_gone_worker_are_adopted_and_a_live_ones_left_alone(
        tmp_path: Path) -> None:
    live = open_spool(tmp_path, "live", default_name=False)
    held = _event()
    live.append(held)
    gone = open_spool(tmp_path, "gone", default_name=False)
    orphaned = [_event(), _event(EventType.RUN_COMPLETED)]
    gone.append_all(orphaned)
    gone.close()

    adopter = open_spool(tmp_path, "adopter", default_name=False)

    assert _ids(adopter.load()) == _ids(orphaned)
    assert not (tmp_path / f"gone{SUFFIX}").exists()
    assert _ids(Spool(tmp_path / f"live{SUFFIX}").load()) == [held.id]
    adopter.close()
    live.close()
