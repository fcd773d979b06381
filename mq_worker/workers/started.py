"""A started run as its watcher sees it: its infrastructure id, and a wait for its end.

A worker type that can start a run without a task of its own (`RunStarter`, such as
ProcessWorker) is watched in the task that took the run: no task group, no task and no
cancel scope per run, which is most of what anyio costs a run. Any other worker type's
`run` hook runs in a task of its own (`RunInTask`), as the hook's contract asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import anyio
import anyio.abc

from mq_worker.job_configuration import BaseJobConfiguration
from mq_worker.messages import RunMessage
from mq_worker.workers.runs import WorkerResult


class StartedRun(Protocol):
    """A run whose infrastructure has started; `wait()` must be awaited to its end."""

    @property
    def infrastructure_pid(self) -> str: ...

    async def wait(self) -> WorkerResult:
        """Wait for the run's end; cancelled, it leaves nothing of the run unwatched."""
        ...


@runtime_checkable
class RunStarter(Protocol):
    """A worker type that starts a run in the caller's task (raising if it cannot)."""

    def start_run(self, run: RunMessage, configuration: BaseJobConfiguration) -> StartedRun: ...


def starts_runs_itself(worker_type: object) -> bool:
    """Whether runs of `worker_type` are started with `start_run`: the most derived class
    that defines `run` or `start_run` defines `start_run` (a subclass that overrides only
    `run` has its `run` called)."""
    if not isinstance(worker_type, RunStarter):
        return False
    for cls in type(worker_type).__mro__:
        if "start_run" in vars(cls):
            return True
        if "run" in vars(cls):
            return False
    return False


class RunHook(Protocol):
    async def run(self, run: RunMessage, configuration: BaseJobConfiguration,
                  task_status: anyio.abc.TaskStatus[str]) -> WorkerResult: ...


class StartAbandoned(Exception):
    """The run's start was abandoned (`RunInTask.abandon`) before its hook reported it
    started: it never ran."""


class RunInTask:
    """A worker type's `run` hook in a task of the worker's task group.

    An error before `task_status.started` is raised by `start`; one after it, by `wait`.
    Cancelling `wait` cancels the hook's task; so does `abandon` before the hook reports
    the run started (`start` then raises StartAbandoned).
    """

    def __init__(self) -> None:
        self.infrastructure_pid = ""
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._result: WorkerResult | None = None
        self._error: BaseException | None = None
        self._status: _Reported | None = None
        self._abandoned = False

    @classmethod
    async def start(cls, worker_type: RunHook, run: RunMessage,
                    configuration: BaseJobConfiguration, spawn: anyio.abc.TaskGroup, *,
                    starting: Callable[[RunInTask], None] | None = None) -> RunInTask:
        """Run the hook until it reports the run started; `starting` is given the
        RunInTask before that, to abandon the start if need be."""
        started = cls()
        if starting is not None:
            starting(started)
        try:
            started.infrastructure_pid = await spawn.start(
                started._run, worker_type, run, configuration)
        except Exception as exc:
            if started._abandoned:
                raise StartAbandoned(str(exc)) from exc
            raise
        return started

    def abandon(self) -> bool:
        """Cancel the hook if it has not reported the run started; whether it had not."""
        if self._status is not None and self._status.reported:
            return False
        self._abandoned = True
        self._scope.cancel()
        return True

    async def _run(self, worker_type: RunHook, run: RunMessage,
                   configuration: BaseJobConfiguration,
                   *, task_status: anyio.abc.TaskStatus[str]) -> None:
        status = self._status = _Reported(task_status)
        try:
            with self._scope:
                self._result = await worker_type.run(run, configuration, status)
        except Exception as exc:
            if not status.reported:
                raise  # to `start`
            self._error = exc
        finally:
            self._done.set()

    async def wait(self) -> WorkerResult:
        try:
            await self._done.wait()
        finally:
            if not self._done.is_set():
                self._scope.cancel()
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("the run's task was cancelled before it returned")
        return self._result


class _Reported:
    """Passes `started` on, and remembers whether it was called."""

    def __init__(self, status: anyio.abc.TaskStatus[str]) -> None:
        self._status = status
        self.reported = False

    def started(self, value: str | None = None) -> None:
        if value is None:
            raise TypeError("task_status.started() needs the run's infrastructure id")
        self.reported = True
        self._status.started(value)
