"""The two async patterns the worker needs again and again, written once.

anyio gives the structure (task groups, cancel scopes); these fill two gaps:
waiting for the first of several events, and a signal that can be set again
after it was seen (an `anyio.Event` cannot be cleared).
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio


async def wait_first(events: Iterable[anyio.Event], timeout: float | None = None) -> bool:
    """Return when any of `events` is set (True) or `timeout` seconds have passed (False)."""
    waited = list(events)
    if any(event.is_set() for event in waited):
        return True
    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as tg:
            for event in waited:
                tg.start_soon(_cancel_when_set, event, tg.cancel_scope)
    return any(event.is_set() for event in waited)


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class Signal:
    """Something changed: set by one side, waited for by the other, cleared to wait again.

    A set that nobody waited for yet is kept until `clear()`, so a waiter that
    clears, looks at the state and then waits misses nothing.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until set (True) or until `timeout` seconds have passed (False)."""
        with anyio.move_on_after(timeout):
            await self._event.wait()
        return self._event.is_set()
