"""A worker type's run hook in a task of its own (workers.started.RunInTask): what its
watcher sees of the hook's start, end, errors and cancellation."""

from __future__ import annotations

import uuid

import anyio
import anyio.abc
import pytest

from mq_worker.job_configuration import BaseJobConfiguration
from mq_worker.messages import RunMessage
from mq_worker.workers.runs import WorkerResult
from mq_worker.workers.started import RunInTask, StartAbandoned

pytestmark = pytest.mark.anyio


class Hook:
    def __init__(self, *, fail_before: bool = False, fail_after: bool = False) -> None:
        self.fail_before, self.fail_after = fail_before, fail_after
        self.end = anyio.Event()
        self.cancelled = False
        self.setting_up = anyio.Event()
        self.set_up = anyio.Event()
        self.set_up.set()
        self.started = False

    async def run(self, run: RunMessage, configuration: BaseJobConfiguration,
                  task_status: anyio.abc.TaskStatus[str]) -> WorkerResult:
        if self.fail_before:
            raise OSError("cannot start")
        self.setting_up.set()
        await self.set_up.wait()
        self.started = True
        task_status.started("host:7")
        try:
            await self.end.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise
        if self.fail_after:
            raise RuntimeError("lost track of it")
        return WorkerResult("host:7", 3)


def _run() -> RunMessage:
    return RunMessage.model_validate({"id": str(uuid.uuid4())})


async def test_the_hook_s_result_is_what_wait_returns() -> None:
    hook = Hook()
    async with anyio.create_task_group() as tg:
        started = await RunInTask.start(hook, _run(), BaseJobConfiguration(), tg)
        assert started.infrastructure_pid == "host:7"
        hook.end.set()
        assert await started.wait() == WorkerResult("host:7", 3)


async def test_an_error_before_the_start_is_raised_by_start_and_not_by_the_group() -> None:
    async with anyio.create_task_group() as tg:
        with pytest.raises(OSError, match="cannot start"):
            await RunInTask.start(Hook(fail_before=True), _run(), BaseJobConfiguration(), tg)


async def test_an_error_after_the_start_is_raised_by_wait_and_not_by_the_group() -> None:
    hook = Hook(fail_after=True)
    async with anyio.create_task_group() as tg:
        started = await RunInTask.start(hook, _run(), BaseJobConfiguration(), tg)
        hook.end.set()
        with pytest.raises(RuntimeError, match="lost track"):
            await started.wait()


async def test_cancelling_the_wait_cancels_the_hook_s_task() -> None:
    hook = Hook()
    with anyio.fail_after(5):  # a hook task left running would keep the group open
        async with anyio.create_task_group() as tg:
            started = await RunInTask.start(hook, _run(), BaseJobConfiguration(), tg)
            with anyio.CancelScope() as watcher:
                watcher.cancel()
                await started.wait()
    # The group ended: the hook's task ended too, cancelled rather than left running.
    assert hook.cancelled and not hook.end.is_set()


async def test_a_start_abandoned_while_the_hook_sets_the_run_up_never_starts_it() -> None:
    hook = Hook()
    hook.set_up = anyio.Event()  # held until the test says
    tasks: list[RunInTask] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async def abandon_once_set_up_began() -> None:
                await hook.setting_up.wait()
                assert tasks[0].abandon()
                hook.set_up.set()

            tg.start_soon(abandon_once_set_up_began)
            with pytest.raises(StartAbandoned):
                await RunInTask.start(hook, _run(), BaseJobConfiguration(), tg,
                                      starting=tasks.append)
    assert not hook.started


async def test_a_start_already_reported_is_not_abandoned() -> None:
    hook = Hook()
    async with anyio.create_task_group() as tg:
        started = await RunInTask.start(hook, _run(), BaseJobConfiguration(), tg)
        assert not started.abandon()
        hook.end.set()
        assert await started.wait() == WorkerResult("host:7", 3)
