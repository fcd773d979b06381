"""The async patterns the worker needs again and again, written once.

anyio gives the structure (task groups, cancel scopes); these fill three gaps:
waiting for the first of several events, a signal that can be set again after it
was seen (an `anyio.Event` cannot be cleared), and a task group's tasks reused for
one item after another (`TaskPool`: a new anyio task costs ~14 µs).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, Generic, TypeVar

import anyio
import anyio.abc

T = TypeVar("T")


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


class _Closed(enum.Enum):
    CLOSED = enum.auto()


_CLOSED: Final = _Closed.CLOSED


class TaskPool(Generic[T]):
    """`handle(item)` for each item, at once, in a task of `tg`; a task that has finished its
    item waits for the next one instead of ending (anyio 4 builds a task handle, an event and
    a cancel scope for every new task: ~14 µs, against ~2.3 µs to wake an idle task).

    Every task is the group's, so the group's rules hold as if each item had a task of its
    own: cancelling the group cancels running and idle tasks alike, an exception raised by
    `handle` fails the group (and cancels the rest), and the group waits for items still
    running. An item never waits for a busy task: without an idle one it gets a new task.
    At most `keep` tasks wait idle. Idle tasks wait for `close()`, which the group's owner
    calls before the group ends (else the group waits for them); an item after `close()`
    gets a task of its own. A reused task keeps the context variables of its first item's
    caller (no handler sets any).

    An idle task waits on an asyncio future: the worker's loop is always asyncio's (uvloop
    or not); aio-pika and aiormq have no other backend.
    """

    def __init__(self, tg: anyio.abc.TaskGroup, handle: Callable[[T], Awaitable[None]], *,
                 keep: int) -> None:
        self._tg = tg
        self._handle = handle
        self._keep = keep
        self._idle: list[asyncio.Future[T | _Closed]] = []
        self._closed = False

    @property
    def idle(self) -> int:
        """Tasks waiting for an item."""
        return sum(not waiter.done() for waiter in self._idle)

    def start_soon(self, item: T) -> None:
        while self._idle:
            waiter = self._idle.pop()
            if not waiter.done():  # done: its task was cancelled while it waited
                waiter.set_result(item)
                return
        self._tg.start_soon(self._serve, item)

    def close(self) -> None:
        """No task waits for items from now on: idle tasks end, busy ones after their item."""
        self._closed = True
        idle, self._idle = self._idle, []
        for waiter in idle:
            if not waiter.done():
                waiter.set_result(_CLOSED)

    async def _serve(self, first: T) -> None:
        loop = asyncio.get_running_loop()
        item: T | _Closed = first
        del first
        while not isinstance(item, _Closed):
            await self._handle(item)
            if self._closed or len(self._idle) >= self._keep:
                return
            waiter: asyncio.Future[T | _Closed] = loop.create_future()
            self._idle.append(waiter)
            item = _CLOSED  # an idle task keeps nothing of its last item alive
            item = await waiter
