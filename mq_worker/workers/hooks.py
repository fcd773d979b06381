"""What a worker type implements: the hooks `BaseWorker` calls, and their defaults.

A worker type subclasses `BaseWorker` (which has these hooks from `WorkerTypeHooks`)
and implements at least `run`: start the run's infrastructure, report it started,
wait for it. `kill_infrastructure` lets runs be cancelled and stopped; the others are
optional. The job configuration a type's runs start with is `job_configuration`, its
base job template derived from it.
"""

from __future__ import annotations

import abc
import builtins
import os
from typing import Any, ClassVar, Protocol

import anyio.abc
from pydantic import BaseModel

from mq_worker.job_configuration import BaseJobConfiguration, variables_schema
from mq_worker.messages import RunMessage
from mq_worker.workers.runs import WorkerResult


class WorkerTypeHooks(abc.ABC):
    """The hooks of a worker type, with their defaults."""

    type: ClassVar[str]
    job_configuration: ClassVar[builtins.type[BaseJobConfiguration]] = BaseJobConfiguration
    # A model declaring the job variables, when they differ from the configuration's fields.
    job_configuration_variables: ClassVar[builtins.type[BaseModel] | None] = None
    description: ClassVar[str] = ""

    @classmethod
    def get_default_base_job_template(cls, grace_seconds: float = 30.0) -> dict[str, Any]:
        """The worker type's base job template: every configuration field a variable."""
        variables = variables_schema(cls.job_configuration_variables or cls.job_configuration)
        if "grace_seconds" in variables.get("properties", {}):
            variables["properties"]["grace_seconds"]["default"] = grace_seconds
        return {
            "job_configuration": cls.job_configuration.json_template(),
            "variables": variables,
        }

    @abc.abstractmethod
    async def run(
        self,
        run: RunMessage,
        configuration: BaseJobConfiguration,
        task_status: anyio.abc.TaskStatus[str],
    ) -> WorkerResult:
        """Start `run`, call `task_status.started(infrastructure_pid)`, wait for it to end."""

    async def kill_infrastructure(
        self,
        infrastructure_pid: str,
        configuration: BaseJobConfiguration,
        grace_seconds: float = 30.0,
    ) -> int:
        """Stop a run's infrastructure; return its exit status. Optional for worker types."""
        raise NotImplementedError("this worker type cannot stop infrastructure")

    def hurry_infrastructure(self, infrastructure_pid: str, longest: float) -> None:
        """Shorten a stop in progress: SIGKILL (or the like) within `longest` seconds.

        Optional for worker types; called when the worker is told to stop at once.
        """

    def check_configuration(self, configuration: BaseJobConfiguration) -> None:
        """Refuse a prepared configuration by raising InvalidMessage (hook for worker types)."""

    async def setup(self) -> None:
        """Called once before the worker takes runs."""

    async def teardown(self) -> None:
        """Called once after the worker has stopped."""

    def base_environment(self) -> dict[str, str]:
        """The environment runs start from: the worker's, without its own settings."""
        return {k: v for k, v in os.environ.items() if not k.startswith("MQ_WORKER_")}


class WorkerType(Protocol):
    """What the life of a run asks of the worker type: these hooks of BaseWorker, no more."""

    @property
    def type(self) -> str: ...

    async def run(self, run: RunMessage, configuration: BaseJobConfiguration,
                  task_status: anyio.abc.TaskStatus[str]) -> WorkerResult: ...

    async def kill_infrastructure(self, infrastructure_pid: str,
                                  configuration: BaseJobConfiguration,
                                  grace_seconds: float = 30.0) -> int: ...

    def hurry_infrastructure(self, infrastructure_pid: str, longest: float) -> None: ...
