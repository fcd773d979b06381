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

RabbitMQ 3.10 answers the passive declare of a quorum queue whose leader it cannot
ask within 250 ms with 0 runs and 0 consumers, the answer of an idle empty queue.
Taken at its word, a higher queue's runs would be passed over for a lower queue's
for as long as its leader cannot be asked. A queue the worker consumes has at least
its consumer, so there `ReadyCounts` lets the count last answered stand instead,
for at most `UNANSWERED_SECONDS`: by then a leader has normally been elected, and a
queue whose leader cannot be reached longer delivers no runs anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

PROBE_SECONDS = 0.5
UNANSWERED_SECONDS = 5.0


class ReadyCounts:
    """The runs ready in each queue, as the passive declares of one worker answer."""

    def __init__(self) -> None:
        self._answered: dict[str, tuple[int, float]] = {}  # count, when (monotonic)

    def read(self, queue: str, ready: int, consumers: int, consuming: bool,
             now: float) -> int:
        """The count to allocate by, from a declare's (ready, consumers) answer;
        `consuming`: whether this worker has a consumer on `queue`."""
        if ready or consumers or not consuming:
            self._answered[queue] = (ready, now)
            return ready
        last, when = self._answered.get(queue, (0, now))
        return last if now - when <= UNANSWERED_SECONDS else 0


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
