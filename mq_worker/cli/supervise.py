"""`start --processes N`: the supervisor's side and the worker process's side of their link."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import anyio

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
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    try:
        writer.write(f"{health_port}\n".encode())
        await writer.drain()
        await reader.read()
    except OSError:
        pass
    finally:
        writer.close()
    stop()
