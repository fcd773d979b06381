"""Queue priority allocation, without a broker."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mq_worker.priority import allocate_windows


def test_a_single_free_slot_goes_to_the_first_queue_with_runs_waiting() -> None:
    assert allocate_windows(1, [0, 0, 3], max_window=1) == [0, 0, 1]
    assert allocate_windows(1, [0, 2, 3], max_window=1) == [0, 1, 0]


def test_lower_queues_get_nothing_while_a_higher_one_has_uncovered_runs() -> None:
    assert allocate_windows(4, [10, 10], max_window=2) == [2, 0]
    assert allocate_windows(4, [1, 10], max_window=4) == [1, 3]


def test_idle_queues_each_listen_with_one_window_and_the_rest_goes_to_the_first() -> None:
    assert allocate_windows(4, [0, 0, 0], max_window=4) == [2, 1, 1]
    assert allocate_windows(1, [0, 0, 0], max_window=4) == [1, 0, 0]
    assert allocate_windows(0, [5, 5], max_window=4) == [0, 0]


@given(
    free=st.integers(min_value=0, max_value=50),
    ready=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=6),
    max_window=st.integers(min_value=1, max_value=20),
)
def test_allocation_never_exceeds_the_free_slots_and_respects_priority(
    free: int, ready: list[int], max_window: int
) -> None:
    windows = allocate_windows(free, ready, max_window)
    assert sum(windows) <= free
    assert all(w <= max_window for w in windows)
    for index, waiting in enumerate(ready):
        if waiting > windows[index]:  # runs left waiting here: no lower queue is served
            assert all(w == 0 for w in windows[index + 1:])
    first_waiting = next((i for i, w in enumerate(ready) if w), None)
    if free and first_waiting is not None:
        assert windows[first_waiting] >= 1
