"""wait_first and Signal, without a broker."""

from __future__ import annotations

import anyio
import pytest

from mq_worker.concurrency import Signal, wait_first

pytestmark = pytest.mark.anyio


async def test_wait_first_returns_when_one_of_several_events_is_set() -> None:
    first, second = anyio.Event(), anyio.Event()
    async def set_second() -> None:
        second.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(set_second)
        assert await wait_first([first, second], timeout=10) is True
    assert not first.is_set()


async def test_wait_first_gives_up_after_its_timeout() -> None:
    assert await wait_first([anyio.Event()], timeout=0.01) is False


async def test_wait_first_returns_at_once_for_an_event_already_set() -> None:
    done = anyio.Event()
    done.set()
    with anyio.fail_after(1):
        assert await wait_first([done, anyio.Event()]) is True


async def test_a_signal_set_before_the_wait_is_not_missed() -> None:
    signal = Signal()
    signal.set()
    assert await signal.wait(timeout=0) is True


async def test_a_cleared_signal_waits_for_the_next_set() -> None:
    signal = Signal()
    signal.set()
    signal.clear()
    assert await signal.wait(timeout=0.01) is False
    async def set_signal() -> None:
        signal.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(set_signal)
        assert await signal.wait(timeout=10) is True
