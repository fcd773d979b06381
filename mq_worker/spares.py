"""Spare slot tokens: a token a worker keeps, between two runs of a target, for the next.

Taking a token is a `basic.get` on a quorum queue, a Raft round before the run can
start. A run that ends while its limit is far from reached and nobody waits keeps its
token on the worker's slots channel, unacknowledged as before, instead of giving it
back; the next run of that target on this worker takes it without asking the broker.
Nothing about the token changes: it is still one message held by one live channel, so
it is never usable twice and returns to the broker if the worker dies or is cut off.

A spare costs the others one slot while it is kept, so a worker keeps at most one per
target, and only while its periodic check (pool_control) last saw at least half of the
limit free and no run waiting, for limits of at least MIN_LIMIT slots; the check gives
it back (and wakes a waiting run for it) as soon as that no longer holds, or once it
has stayed unused for IDLE_SECONDS.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection
from typing import NamedTuple

import aiormq.abc

# Smaller limits keep no spares: one slot kept idle would be a large share of them.
MIN_LIMIT = 4
# A spare unused for this long is given back (by the next check: see `idle_in`).
IDLE_SECONDS = 0.5


class HeldToken(NamedTuple):
    target: str
    tag: int
    number: int
    version: int
    spare: bool = False  # taken from this worker's spares, not from the broker
    # The channel holding it, if not its lease's (a second target's, taken alongside).
    channel: aiormq.abc.AbstractChannel | None = None
    # Redelivered by the broker and not yet held unused for long enough (see slots).
    returned: bool = False


# (channel, tokens to give back, tokens to destroy): see SlotRequests.settle.
Settle = Callable[[aiormq.abc.AbstractChannel, list["HeldToken"], Collection["HeldToken"]],
                  Awaitable[None]]


class Spares:
    """The spare tokens one worker holds, at most one per target, on one channel."""

    def __init__(self, still_valid: Callable[[str, int, int], bool], settle: Settle) -> None:
        self._held: dict[str, tuple[HeldToken, float]] = {}
        self._ample: set[str] = set()
        self._still_valid = still_valid  # (target, number, version): may it be used
        self._settle = settle

    def __bool__(self) -> bool:
        return bool(self._held)

    def forget(self) -> None:
        """The channel holding them is gone (the broker has put them back)."""
        self._held.clear()
        self._ample.clear()

    def take(self, target: str) -> HeldToken | None:
        held = self._held.pop(target, None)
        return None if held is None else held[0]._replace(spare=True)

    def keep(self, token: HeldToken) -> bool:
        """Keep `token` of an ended run as the spare of its target, if it may be kept."""
        if token.target not in self._ample or token.target in self._held or token.returned:
            return False
        self._held[token.target] = (token._replace(spare=False), time.monotonic())
        return True

    def observe(self, target: str, limit: int | None, free: int, waiting: int) -> HeldToken | None:
        """What a check saw of `target` (limit None: removed); the spare to give back now."""
        ample = limit is not None and limit >= MIN_LIMIT and not waiting and 2 * free >= limit
        if ample:
            self._ample.add(target)
        else:
            self._ample.discard(target)
        held = self._held.get(target)
        if held is not None and (not ample or time.monotonic() - held[1] > IDLE_SECONDS):
            del self._held[target]
            return held[0]
        return None

    def targets(self) -> list[str]:
        return list(self._held)

    def idle_in(self) -> float:
        """Seconds until a spare has stayed unused for IDLE_SECONDS (inf: none kept)."""
        if not self._held:
            return float("inf")
        oldest = min(kept for _, kept in self._held.values())
        return max(0.0, oldest + IDLE_SECONDS - time.monotonic()) + 0.01

    async def take_for(self, targets: list[str], tokens: list[HeldToken],
                       channel: aiormq.abc.AbstractChannel) -> list[str]:
        """Add the spares of `targets` to `tokens`; the targets left without one."""
        if not self._held:
            return targets
        needed = []
        for target in targets:
            spare = self.take(target)
            if spare is not None and self._still_valid(target, spare.number, spare.version):
                tokens.append(spare)
                continue
            if spare is not None:  # the limit shrank meanwhile: destroy it
                await self._settle(channel, [], [spare])
            needed.append(target)
        return needed

    async def give_back_if_due(self, channel: aiormq.abc.AbstractChannel, target: str,
                               limit: int | None, free: int, waiting: int) -> bool:
        """What a check saw of `target`: give its spare back if it may no longer be kept
        (destroyed if no longer valid); whether a slot was given back."""
        spare = self.observe(target, limit, free, waiting)
        if spare is None:
            return False
        if self._still_valid(target, spare.number, spare.version):
            await self._settle(channel, [spare], ())
            return True
        await self._settle(channel, [], [spare])
        return False
