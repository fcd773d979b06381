"""TaskPool: items handled in tasks of a task group, idle tasks reused, the group's rules kept."""

from __future__ import annotations

import asyncio
import gc
import weakref

import anyio
import anyio.lowlevel
import pytest

from mq_worker.concurrency import TaskPool

pytestmark = pytest.mark.anyio


class Handled:
    """A handler that records the task of each item and waits until its item is released."""

    def __init__(self) -> None:
        self.tasks: dict[int, asyncio.Task[object]] = {}
        self.started: dict[int, anyio.Event] = {}
        self.release: dict[int, anyio.Event] = {}
        self.ended: dict[int, anyio.Event] = {}
        self.finished: list[int] = []
        self.cancelled: list[int] = []

    def expect(self, *items: int) -> None:
        for item in items:
            self.started[item], self.release[item] = anyio.Event(), anyio.Event()
            self.ended[item] = anyio.Event()

    async def __call__(self, item: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks[item] = task
        self.started[item].set()
        try:
            await self.release[item].wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(item)
            raise
        if item < 0:
            raise ValueError(f"item {item} failed")
        self.finished.append(item)
        # Set last: its task goes on to wait for an item (or ends) before anyone wakes.
        self.ended[item].set()

    async def all_started(self, *items: int) -> None:
        with anyio.fail_after(5):
            for item in items:
                await self.started[item].wait()

    async def all_ended(self, *items: int) -> None:
        with anyio.fail_after(5):
            for item in items:
                await self.ended[item].wait()


async def test_each_item_runs_at_once_in_a_task_of_its_own_even_when_every_task_is_busy() -> None:
    handled = Handled()
    handled.expect(1, 2, 3)
    with anyio.fail_after(5):  # a task the group waits for forever fails here
        async with anyio.create_task_group() as tg:
            pool = TaskPool(tg, handled, keep=1)
            for item in (1, 2, 3):
                pool.start_soon(item)
            await handled.all_started(1, 2, 3)  # nothing waits for a busy task to free
            assert len({id(task) for task in handled.tasks.values()}) == 3
            for item in (3, 1, 2):
                handled.release[item].set()
            await handled.all_ended(1, 2, 3)
            pool.close()
    assert handled.finished == [3, 1, 2]


async def test_a_task_that_has_finished_its_item_takes_the_next_one() -> None:
    handled = Handled()
    handled.expect(1, 2, 3, 4)
    with anyio.fail_after(5):  # a task the group waits for forever fails here
        async with anyio.create_task_group() as tg:
            pool = TaskPool(tg, handled, keep=2)
            pool.start_soon(1)
            pool.start_soon(2)
            await handled.all_started(1, 2)
            handled.release[1].set()
            handled.release[2].set()
            await handled.all_ended(1, 2)
            assert pool.idle == 2
            pool.start_soon(3)
            pool.start_soon(4)
            await handled.all_started(3, 4)
            assert {id(handled.tasks[3]), id(handled.tasks[4])} == {
                id(handled.tasks[1]), id(handled.tasks[2])}
            handled.release[3].set()
            handled.release[4].set()
            pool.close()
    assert sorted(handled.finished) == [1, 2, 3, 4]


async def test_no_more_than_keep_tasks_wait_idle() -> None:
    handled = Handled()
    items = list(range(1, 7))
    handled.expect(*items)
    with anyio.fail_after(5):  # a task the group waits for forever fails here
        async with anyio.create_task_group() as tg:
            pool = TaskPool(tg, handled, keep=2)
            for item in items:
                pool.start_soon(item)
            await handled.all_started(*items)
            for item in items:
                handled.release[item].set()
            await handled.all_ended(*items)
            assert pool.idle == 2
            assert sum(not task.done() for task in handled.tasks.values()) == 2
            pool.close()


async def test_close_lets_the_group_end_and_waits_for_items_still_running() -> None:
    handled = Handled()
    handled.expect(1, 2, 3)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            pool = TaskPool(tg, handled, keep=8)
            pool.start_soon(1)
            pool.start_soon(2)
            await handled.all_started(1, 2)
            handled.release[1].set()
            await handled.all_ended(1)
            assert pool.idle == 1
            pool.close()  # 1's task is idle and ends; 2 still runs, and the group waits for it
            pool.start_soon(3)  # an item after close gets a task of its own
            await handled.all_started(3)
            handled.release[3].set()
            handled.release[2].set()
    assert sorted(handled.finished) == [1, 2, 3]
    assert all(task.done() for task in handled.tasks.values())


async def test_cancelling_the_group_cancels_running_and_idle_tasks_and_leaves_none() -> None:
    handled = Handled()
    handled.expect(1, 2, 3)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            pool = TaskPool(tg, handled, keep=8)
            for item in (1, 2, 3):
                pool.start_soon(item)
            await handled.all_started(1, 2, 3)
            handled.release[1].set()
            await handled.all_ended(1)
            assert pool.idle == 1
            tg.cancel_scope.cancel()  # no close(): the group ends all the same
    assert handled.finished == [1]
    assert sorted(handled.cancelled) == [2, 3]
    assert all(task.done() for task in handled.tasks.values())


async def test_an_item_that_raises_fails_the_group_and_cancels_the_other_items() -> None:
    handled = Handled()
    handled.expect(1, -2)
    with pytest.raises(ExceptionGroup) as raised, anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            pool = TaskPool(tg, handled, keep=8)
            pool.start_soon(1)
            pool.start_soon(-2)
            await handled.all_started(1, -2)
            handled.release[-2].set()
            await anyio.sleep_forever()
    assert [str(error) for error in raised.value.exceptions] == ["item -2 failed"]
    assert handled.cancelled == [1]
    assert all(task.done() for task in handled.tasks.values())


async def test_an_item_in_a_reused_task_that_raises_is_not_lost() -> None:
    handled = Handled()
    handled.expect(1, -2)
    with pytest.raises(ExceptionGroup) as raised, anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            pool = TaskPool(tg, handled, keep=8)
            pool.start_soon(1)
            handled.release[1].set()
            await handled.all_ended(1)
            assert pool.idle == 1
            handled.release[-2].set()
            pool.start_soon(-2)
            await anyio.sleep_forever()
    assert [str(error) for error in raised.value.exceptions] == ["item -2 failed"]
    assert handled.tasks[1] is handled.tasks[-2]


async def test_an_idle_task_keeps_nothing_of_its_last_item_alive() -> None:
    class Item:
        pass

    done = anyio.Event()

    async def handle(item: Item) -> None:
        await anyio.lowlevel.checkpoint()
        done.set()  # its task waits for the next item before anyone wakes

    item = Item()
    seen = weakref.ref(item)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            pool = TaskPool(tg, handle, keep=1)
            pool.start_soon(item)
            del item
            await done.wait()
            assert pool.idle == 1
            gc.collect()
            assert seen() is None
            pool.close()
