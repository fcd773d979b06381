"""`mq-worker start`: a worker until SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import sys
from typing import Any

import anyio
import click
from pydantic import ValidationError

from mq_worker import logs
from mq_worker.cli.common import (
    color_option,
    color_wanted,
    fail,
    run,
    validation_message,
    warn_unknown_environment,
)
from mq_worker.cli.options import given, settings_options
from mq_worker.errors import ConfigurationError
from mq_worker.settings import WorkerSettings


@click.command()
@settings_options
@color_option
@click.option("--supervisor-fd", "supervisor_fd", type=int, default=None, hidden=True)
def start(color: bool | None, supervisor_fd: int | None, **options: Any) -> None:
    """Start a worker. Every option is also an MQ_WORKER_<OPTION> environment variable
    (lists comma-separated); the command line wins over the environment.

    SIGTERM or SIGINT stops it gracefully (a second signal: at once); it exits 0.
    """
    warn_unknown_environment()
    try:
        settings = WorkerSettings(**given(options))
    except ValidationError as exc:
        fail(validation_message(exc), 2)
    logs.configure(settings.log_format, settings.log_level,
                   colors=color_wanted(color, sys.stderr))
    if settings.processes > 1:
        from mq_worker.cli.supervise import supervise

        sys.exit(run(lambda: supervise(settings, given(options)), settings.loop, quiet=False))
    run(lambda: serve(settings, supervisor_fd), settings.loop, quiet=False)


async def serve(settings: WorkerSettings, supervisor_fd: int | None = None) -> None:
    from mq_worker import sd_notify
    from mq_worker.workers.base import worker_class

    try:
        worker = worker_class(settings.type)(settings)
    except ConfigurationError as exc:
        fail(str(exc), 2)

    async def _signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
            async for _ in received:
                sd_notify.notify("STOPPING=1", "STATUS=stopping: draining runs")
                worker.stop()

    async def _ready() -> None:
        await worker.ready.wait()
        sd_notify.notify("READY=1", f"STATUS=consuming pool {worker.pool}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(_signals)
        tg.start_soon(_ready)
        if settings.health_port is not None:
            from mq_worker.health import serve_health

            bound = await tg.start(serve_health, worker, settings.health_port,
                                   settings.health_host)
            if supervisor_fd is not None:
                from mq_worker.cli.supervise import report_to_supervisor

                tg.start_soon(report_to_supervisor, supervisor_fd, bound, worker.stop)
        await worker.serve()
        tg.cancel_scope.cancel()
