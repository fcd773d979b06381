"""`start --processes N`: the supervisor's side and the worker process's side of their link."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from mq_worker.settings import WorkerSettings


async def supervise(settings: WorkerSettings, options: dict[str, Any]) -> int:
    """Run `settings.processes` workers until they are stopped; the exit code."""
    from mq_worker.supervisor import Supervisor

    supervisor = Supervisor(options, name=settings.name, limit=settings.limit,
                            processes=settings.processes)
    async with anyio.create_task_group() as tg:
        if settings.health_port is not None:
            from mq_worker.health import serve_handler
            from mq_worker.supervisor_health import SupervisorHealth

            await tg.start(serve_handler, SupervisorHealth(supervisor), settings.health_port,
                           settings.health_host)
        code = await supervisor.run()
        tg.cancel_scope.cancel()
    return code


async def report_to_supervisor(fd: int, health_port: int, stop: Callable[[], None]) -> None:
    """Tell the supervisor our health port, then stop gracefully if it goes away."""
    supervisor = await anyio.abc.UNIXSocketStream.from_socket(fd)
    async with supervisor:
        try:
            await supervisor.send(f"{health_port}\n".encode())
            async for _ in supervisor:  # it never writes: the end of the stream is the news
                pass
        except (OSError, anyio.BrokenResourceError):
            pass
    stop()
