"""Queue priority: which of a worker's queues gets its free slots.

A worker serving several queues lists them highest priority first. Given the
slots it can still fill and how many runs wait in each queue (read from the
broker), `allocate_windows` says how many deliveries each queue's consumer may
have outstanding:

* queues with runs waiting are served in order; a lower queue gets nothing
  while a higher one still has runs that the allocation could not cover;
* when every waiting run is covered, each empty queue still gets a window of
  one (if slots remain), so that a run arriving there is pushed at once;
* what is left goes to the first queue, up to the largest window.

With push there is no way to ask for "the next run of the highest non-empty
queue": a window open on a lower queue takes a run that arrives there even if
a higher queue fills a moment later. That inversion is bounded by the windows
open on lower queues, which never exceed the free slots, and it ends at the
next reallocation (on every freed slot, and every `PROBE_SECONDS` while a
queue is not listened to).
"""

from __future__ import annotations

from collections.abc import Sequence

PROBE_SECONDS = 0.5


def allocate_windows(free: int, ready: Sequence[int], max_window: int) -> list[int]:
    """Windows per queue (same order as `ready`, highest priority first) for `free` slots."""
    windows = [0] * len(ready)
    left = max(0, free)
    cap = max(1, max_window)
    for index, waiting in enumerate(ready):
        take = min(left, max(0, waiting), cap)
        windows[index] = take
        left -= take
        if waiting > take:
            return windows  # runs still wait here: nothing for lower queues
    for index in range(len(windows)):
        if left <= 0:
            break
        if windows[index] == 0:
            windows[index] = 1
            left -= 1
    if windows and left > 0:
        windows[0] += min(left, cap - windows[0]) if windows[0] < cap else 0
    return windows
