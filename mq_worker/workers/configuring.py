"""The configuration a run starts with: the base job template, its job variables, the
worker's environment, checked by the worker type."""

from __future__ import annotations

from collections.abc import Callable

from mq_worker.errors import ConfigurationError
from mq_worker.job_configuration import BaseJobConfiguration, BaseJobTemplate, RunContext
from mq_worker.messages import RunMessage


class Configurer:
    def __init__(
        self,
        *,
        worker_type: str,
        configuration_type: type[BaseJobConfiguration],
        template: BaseJobTemplate,
        pool: str,
        worker: str,
        base_environment: Callable[[], dict[str, str]],
        check: Callable[[BaseJobConfiguration], None],
    ) -> None:
        self._type = configuration_type
        self.template = template
        self._pool = pool
        self._worker = worker
        self._base_environment = base_environment
        self._check = check
        self._contexts: dict[str, RunContext] = {}
        unknown = set(template.job_configuration) - set(configuration_type.model_fields)
        if unknown:
            raise ConfigurationError(
                f"job_configuration has fields a {worker_type!r} worker does not know: "
                + ", ".join(sorted(unknown))
            )

    def configure(self, run: RunMessage, queue: str) -> BaseJobConfiguration:
        """`run`'s configuration; InvalidMessage if the template or the worker type refuse it."""
        configuration = self._type.from_template_and_values(
            self.template, run.merged_job_variables()
        )
        context = self._contexts.get(queue)
        if context is None:  # the environment is the worker's: read once, not per run
            context = self._contexts[queue] = RunContext(
                pool=self._pool, queue=queue, worker=self._worker,
                base_env=self._base_environment(),
            )
        configuration.prepare_for_run(run, context)
        self._check(configuration)
        return configuration
