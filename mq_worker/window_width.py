"""How wide the consumer's window is, given `--window` at the limit: the whole limit while
runs are short, half of it otherwise.

A window of the whole limit lets the broker push a run into every slot that frees, and
settles acknowledgements in groups of half the limit, which the quorum queue settles for
about the cost of one (docs/benchmarks.md): the fastest for runs of milliseconds. Its price
is that once half the slots are busy, a started run's acknowledgement waits for a slot to
free: with one consumer whose prefetch is the whole limit, every started run's
acknowledgement waits until some run ends. While runs end within milliseconds that wait is
short. One that has waited `WIDE_GRACE` tells that they do not: the consumer is re-sized to
the narrow window (half the limit), where acknowledgements wait only near full capacity (up
to `--ack-grace`). It widens again after runs that freed their slot within `SHORT_RUN` of
their start, `WIDEN_AFTER` times the limit of them in a row (runs handed on without starting
do not count), as soon as its consumer can be replaced by a wider one.

The window starts wide: a window of half the limit hardly ever finds the room to grow
while runs wait in the queue. The price is that the first run to outlast `WIDE_GRACE`
while the window is wide waits that long for its acknowledgement, and a consumer re-size.

Without `--window`, with another width, or with a limit of 2 or less (half of it is no
narrower), the width is fixed: a wide window delays the acknowledgement of every run that
starts, even on an idle worker (docs/operations.md "Consumer timeout").
"""

from __future__ import annotations

# Longest wait of a started run's acknowledgement while the window is wide: well above
# what runs of milliseconds take on a loaded host, where a narrowing would only cost a
# consumer re-size (and the broker returns what it had in flight on the consumer).
WIDE_GRACE = 0.25
SHORT_RUN = 0.05  # the longest a run may last to count as short (towards widening)
WIDEN_AFTER = 4  # times the limit: short runs in a row before the window widens again
# How long a deferred acknowledgement that fits waits for others to fit with it. Near
# capacity runs end every few milliseconds when they are short; when they are long, a
# free slot stays empty this long at most.
ACK_GROUP_WAIT = 0.002


def ack_group(width: int, limit: int) -> int:
    """How many deferred acknowledgements go together: half the window; both of a window
    of two when the limit has room for them to fit at once (twice the window), else a
    first acknowledgement would wait ACK_GROUP_WAIT for a second that cannot join it."""
    if width == 2 and limit >= 2 * width:
        return 2
    return max(1, width // 2)


class WindowWidth:
    """The width of one consumer's window, `wide` while runs are short, else `narrow`."""

    def __init__(self, narrow: int, wide: int) -> None:
        self.narrow = narrow
        self.wide = max(narrow, wide)
        self.is_wide = True
        self._short_in_a_row = 0

    @property
    def width(self) -> int:
        return self.wide if self.is_wide else self.narrow

    def ack_grace(self, configured: float, prefetch: int) -> float:
        """How long a started run's acknowledgement, on a consumer of `prefetch`, may wait
        for a free slot: `WIDE_GRACE` on one wider than the narrow window."""
        return min(configured, WIDE_GRACE) if prefetch > self.narrow else configured

    def run_ended(self, seconds: float) -> bool:
        """A run freed its slot `seconds` after it started. True: the window widens now."""
        if self.is_wide:
            return False
        if seconds > SHORT_RUN:
            self._short_in_a_row = 0
            return False
        self._short_in_a_row += 1
        if self._short_in_a_row < WIDEN_AFTER * self.wide:
            return False
        self.is_wide = True
        return True

    def acknowledgement_overdue(self) -> bool:
        """An acknowledgement waited its grace for a free slot. True: the window narrows now."""
        if not self.is_wide or self.wide == self.narrow:
            return False
        self.is_wide = False
        self._short_in_a_row = 0
        return True
