"""The `process` worker: each run is a local OS process."""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping
from typing import Any, ClassVar, cast

import anyio
import anyio.abc
from pydantic import Field, field_validator

from mq_worker.errors import InfrastructureNotAvailable, InfrastructureNotFound, InvalidMessage
from mq_worker.infrastructure import (
    Guardian,
    OutputReader,
    ProcessHandle,
    read_output,
    start_process,
    stop_leftovers,
    terminate,
)
from mq_worker.job_configuration import BaseJobConfiguration
from mq_worker.messages import RunMessage
from mq_worker.policies import PolicyVariables
from mq_worker.resources import raise_descriptor_limit
from mq_worker.workers.base import BaseWorker, WorkerResult


class ProcessJobConfiguration(PolicyVariables, BaseJobConfiguration):
    working_dir: str | None = Field(default=None, description="Directory the run starts in.")
    stream_output: bool = Field(
        default=True, description="Log the run's stdout and stderr through the worker."
    )
    grace_seconds: float = Field(
        default=30.0, ge=0, le=3600,
        description="Seconds between SIGTERM and SIGKILL on cancel or timeout.",
    )

    @field_validator("working_dir")
    @classmethod
    def _no_nul(cls, working_dir: str | None) -> str | None:
        if working_dir is not None and "\x00" in working_dir:
            raise ValueError("working_dir contains a NUL byte")
        return working_dir


class ProcessWorker(BaseWorker):
    """Runs each run's command as a process of its own process group on this host."""

    type: ClassVar[str] = "process"
    job_configuration: ClassVar[builtins.type[BaseJobConfiguration]] = ProcessJobConfiguration
    description: ClassVar[str] = "Runs each run as a local process."

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handles: dict[int, ProcessHandle] = {}
        self._guardian = Guardian()
        self._allowed = [
            os.path.join(os.path.realpath(p), "") for p in self.settings.allow_command_prefix
        ]

    async def setup(self) -> None:
        before, after = raise_descriptor_limit()
        if after > before:
            self.log.info("raised the limit on open descriptors", before=before, after=after)
        self._guardian.start()

    async def teardown(self) -> None:
        await anyio.to_thread.run_sync(self._guardian.stop)

    def check_configuration(self, configuration: BaseJobConfiguration) -> None:
        self._allowed_executable(configuration, configuration.argv())

    def _allowed_executable(self, configuration: BaseJobConfiguration,
                            argv: list[str]) -> str | None:
        """The file the allow-list admits for this run (None without an allow-list).

        That exact file is executed: exec must not go on to the next PATH entry
        when the checked file cannot be executed (no shebang, a missing interpreter).
        """
        if not self._allowed:
            return None
        assert isinstance(configuration, ProcessJobConfiguration)
        cwd = configuration.working_dir or os.getcwd()
        resolved = executable_path(argv[0], configuration.env, cwd)
        if resolved is None:
            raise InvalidMessage(f"command {argv[0]!r} is not allowed: not found on PATH")
        if not any(resolved.startswith(prefix) for prefix in self._allowed):
            raise InvalidMessage(
                f"command {resolved!r} is not allowed: it is outside "
                + ", ".join(self._allowed)
            )
        return resolved

    async def run(
        self,
        run: RunMessage,
        configuration: BaseJobConfiguration,
        task_status: anyio.abc.TaskStatus[str],
    ) -> WorkerResult:
        started = self.start_run(run, configuration)
        task_status.started(started.infrastructure_pid)
        return await started.wait()

    def start_run(self, run: RunMessage, configuration: BaseJobConfiguration) -> ProcessRun:
        """Start the run's process in the caller's task, which then awaits its `wait()`."""
        assert isinstance(configuration, ProcessJobConfiguration)
        argv = configuration.argv()
        env = configuration.env  # prepare_for_run has taken out the unset ones, unless bypassed
        if None in env.values():
            env = {k: v for k, v in env.items() if v is not None}
        handle = start_process(
            argv,
            executable=self._allowed_executable(configuration, argv),
            env=cast(dict[str, str], env),
            cwd=configuration.working_dir,
            capture_output=configuration.stream_output,
        )
        self._handles[handle.pid] = handle
        self._guardian.watch(handle.pid)
        return ProcessRun(self, run, configuration, handle)

    async def _watch(self, run: RunMessage, configuration: ProcessJobConfiguration,
                     handle: ProcessHandle, identifier: str) -> WorkerResult:
        logger = self.log.bind(run_id=run.id_text, infrastructure_pid=identifier)
        empty = False
        try:
            if configuration.stream_output:
                output = self.output.open(run.id_text, configuration.env.get("MQ_WORKER_QUEUE"))
                reader: OutputReader | None = None
                try:
                    reader = read_output(handle, logger, output.line)
                    status = await handle.wait()
                    empty = await self._stop_leftovers(handle, configuration, logger)
                    await reader.closed()
                finally:
                    if reader is not None:
                        reader.close()
                    output.close()
            else:  # no task of its own: waited for here
                status = await handle.wait()
                empty = await self._stop_leftovers(handle, configuration, logger)
        finally:
            # A group that still has processes stays with the guardian, which stops
            # it if the worker ends: it is never forgotten while alive.
            if empty or not handle.group_alive():
                self._guardian.forget(handle.pid)
                del self._handles[handle.pid]
            else:
                logger.error("the run's processes are still running; "
                             "they are stopped when the worker exits")
        return WorkerResult(identifier, status)

    async def _stop_leftovers(
        self, handle: ProcessHandle, configuration: ProcessJobConfiguration, logger: Any
    ) -> bool:
        if not handle.group_alive():
            return True
        logger.info("the run's main process exited; stopping the processes it left "
                    "in its process group", grace_seconds=configuration.grace_seconds)
        empty = await stop_leftovers(handle, configuration.grace_seconds)
        if not empty:
            logger.error("processes of the run survived SIGKILL")
        return empty

    def hurry_infrastructure(self, infrastructure_pid: str, longest: float) -> None:
        handle = self._handles.get(int(infrastructure_pid.rpartition(":")[2]))
        if handle is not None:
            handle.hurry(longest)

    async def kill_infrastructure(
        self,
        infrastructure_pid: str,
        configuration: BaseJobConfiguration,
        grace_seconds: float = 30.0,
    ) -> int:
        host, _, pid_text = infrastructure_pid.rpartition(":")
        if host != self.hostname:
            raise InfrastructureNotAvailable(
                f"run process {infrastructure_pid} is on another host than this worker's"
            )
        handle = self._handles.get(int(pid_text))
        if handle is None or handle.returncode is not None:
            raise InfrastructureNotFound(f"run process {infrastructure_pid} has already exited")
        return await terminate(handle, grace_seconds)


class ProcessRun:
    """A run's started process, waited for in its watcher's task (see workers.started)."""

    def __init__(self, worker: ProcessWorker, run: RunMessage,
                 configuration: ProcessJobConfiguration, handle: ProcessHandle) -> None:
        self._worker = worker
        self._run = run
        self._configuration = configuration
        self._handle = handle
        self.infrastructure_pid = f"{worker.hostname}:{handle.pid}"

    async def wait(self) -> WorkerResult:
        return await self._worker._watch(self._run, self._configuration, self._handle,
                                         self.infrastructure_pid)


def executable_path(name: str, env: Mapping[str, str | None], cwd: str) -> str | None:
    """The file that executing `name` with `env` in `cwd` runs, with its directory resolved.

    A name without '/' is looked up in the PATH of `env` (the default path when
    it has none) as exec does; relative paths are relative to `cwd`. Symbolic
    links and '..' in the directory are resolved as the kernel resolves them;
    the file itself may be a link. None when a bare name is found nowhere.
    """
    path = os.path.join(cwd, name) if os.sep in name else None
    if path is None:
        search = env.get("PATH")
        for directory in os.get_exec_path({} if search is None else {"PATH": search}):
            candidate = os.path.join(cwd, directory, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                path = candidate
                break
        else:
            return None
    directory, base = os.path.split(path)
    return os.path.join(os.path.realpath(directory), base)
