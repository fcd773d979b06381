"""How a cold worker's replay splits the cancel window into ranges, and where the usual
consumer reads on when some range stopped short (mq_worker.cancel_replay)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mq_worker import cancel_replay
from mq_worker.cancel_replay import _outcome, _Range, _split


@pytest.fixture(autouse=True)
def four_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cancel_replay, "READERS", 4)
    monkeypatch.setattr(cancel_replay, "MIN_PER_READER", 100)


def test_ranges_cover_the_window_without_gap_or_overlap_and_the_last_reads_to_the_marker() -> None:
    ranges = _split(1_000, 1_999)
    assert [(r.first, r.last) for r in ranges] == [
        (1_000, 1_249), (1_250, 1_499), (1_500, 1_749), (1_750, None)]


def test_a_short_window_is_read_by_fewer_readers() -> None:
    assert len(_split(0, 249)) == 2
    assert len(_split(0, 50)) == 1


def test_every_range_finished_is_caught_up_where_the_last_one_stopped() -> None:
    ranges = _split(0, 399)
    for part in ranges:
        part.finished = True
        part.next_offset = (part.last if part.last is not None else 405) + 1
    ranges[-1].last_message = (b"marker", "m")
    outcome = _outcome(ranges)
    assert (outcome.caught_up, outcome.next_offset, outcome.last_message) == (
        True, 406, (b"marker", "m"))
    assert outcome.already_read == []


def test_a_range_stopped_short_reads_on_from_it_stepping_over_what_later_ones_read() -> None:
    first, second, third, last = _split(0, 399)
    first.finished, first.next_offset, first.last_message = True, 100, (b"99", None)
    second.next_offset, second.last_message = 150, (b"149", None)  # stopped at 150
    third.finished, third.next_offset = True, 300
    last.next_offset = 320  # stopped too, at 320
    outcome = _outcome([first, second, third, last])
    assert (outcome.caught_up, outcome.next_offset, outcome.last_message) == (
        False, 150, (b"149", None))
    assert outcome.already_read == [(200, 299), (300, 319)]


def test_a_range_that_read_nothing_reads_on_from_its_first_offset() -> None:
    first, second = _split(0, 199)
    first.finished, first.next_offset, first.last_message = True, 100, (b"99", None)
    outcome = _outcome([first, second])
    assert (outcome.next_offset, outcome.last_message) == (100, (b"99", None))


def test_a_single_range_from_the_window_start_that_read_nothing_leaves_the_offset_unknown() -> None:
    outcome = _outcome([_Range(datetime.now(UTC), None)])
    assert (outcome.caught_up, outcome.next_offset, outcome.last_message) == (False, None, None)
