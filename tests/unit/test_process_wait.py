"""Waiting for a run's process to exit, on its pidfd: the exit code, and a wait that was
cancelled (a cancel scope, a timeout) leaves nothing behind that breaks the next wait."""

from __future__ import annotations

import shutil
import signal

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from mq_worker.infrastructure import start_process

pytestmark = pytest.mark.anyio

SH = shutil.which("sh") or "/bin/sh"


async def test_the_exit_code_of_each_of_many_runs() -> None:
    handles = [start_process([SH, "-c", f"exit {code}"], env={}, cwd=None,
                             capture_output=False, executable=SH) for code in range(20)]
    assert [await handle.wait() for handle in handles] == list(range(20))


async def test_a_cancelled_wait_then_a_new_one_sees_the_exit() -> None:
    handle = start_process([SH, "-c", "sleep 60"], env={}, cwd=None, capture_output=False,
                           executable=SH)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle.wait)
        await wait_all_tasks_blocked()  # the wait is registered on the pidfd
        tg.cancel_scope.cancel()
    assert handle.returncode is None and not handle.exit_seen
    handle.signal_group(signal.SIGTERM)
    with anyio.fail_after(10):
        assert await handle.wait() == -signal.SIGTERM
