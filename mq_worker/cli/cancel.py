"""`mq-worker cancel`: cancel a run wherever it is; optionally wait for the outcome."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from uuid import UUID

import anyio
import click

from mq_worker import logs
from mq_worker.cli.common import (
    DURATION,
    URL_HELP,
    client_settings,
    color_option,
    color_wanted,
    fail,
    quiet_client_logging,
    run,
)
from mq_worker.cli.events import format_event
from mq_worker.events import TERMINAL_TYPES, Event, EventType

NOT_HELD = 3
_PING_EVERY = 2.0

EXIT_CODES = """\b
Exit codes with --wait:
  0    the run was cancelled
  1    the run ended otherwise (completed or crashed), or an error
  2    a usage error
  3    no worker of the pool reports the run within --listen
  124  --timeout passed"""


@click.command(epilog=EXIT_CODES)
@click.argument("run_id", type=click.UUID)
@click.option("--url", "urls", multiple=True, help=URL_HELP)
@click.option("--pool", help="Work pool of the run. [default: default; env: MQ_WORKER_POOL]")
@click.option("--reason", help="Why; carried in the cancelled event.")
@click.option("--wait", is_flag=True, help="Wait for the run's terminal event.")
@click.option("--listen", type=DURATION, default=5.0, show_default=True,
              help="With --wait: give up when no worker of the pool reports holding the run "
                   "for this long (it has ended, or is queued or parked: the cancel still "
                   "stops it when it is delivered).")
@click.option("--timeout", type=DURATION, default=None,
              help="With --wait: give up after this long in any case. [default: none]")
@click.option("--signing-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Sign the cancel with this key. [env: MQ_WORKER_SIGNING_KEY_FILE]")
@color_option
def cancel(
    run_id: UUID, urls: tuple[str, ...], pool: str | None, reason: str | None, wait: bool,
    listen: float, timeout: float | None, signing_key_file: Path | None, color: bool | None,
) -> None:
    """Cancel RUN_ID wherever it is: running, held, queued, parked or not yet published."""
    logs.configure("console", "WARNING")
    quiet_client_logging()
    settings = client_settings(urls, pool=pool, signing_key_file=signing_key_file)
    stdout_color = color_wanted(color, sys.stdout)

    async def _cancel() -> int:
        from mq_worker.publisher import Publisher
        from mq_worker.status import send_ping
        from mq_worker.subscriber import EventSubscriber

        async with Publisher(settings.url, tls=settings.tls,
                             signing_key_file=settings.signing_key_file) as publisher:
            if not wait:
                await publisher.cancel(run_id, pool=settings.pool, reason=reason)
                return 0
            types = [*TERMINAL_TYPES, EventType.WORKER_HEARTBEAT]
            async with EventSubscriber(settings.url, tls=settings.tls, types=types) as events:
                await publisher.cancel(run_id, pool=settings.pool, reason=reason)
                outcome: Event | None = None
                held_until = time.monotonic() + listen
                with anyio.fail_after(timeout if timeout is not None else float("inf")):
                    async with anyio.create_task_group() as tg:

                        async def _ping_until_unheld() -> None:
                            while time.monotonic() < held_until:
                                await send_ping(settings.url, settings.tls)
                                await anyio.sleep(min(_PING_EVERY, listen))
                            tg.cancel_scope.cancel()

                        tg.start_soon(_ping_until_unheld)
                        async for event in events:
                            if event.subject == str(run_id) and event.is_terminal:
                                outcome = event
                                break
                            if (event.type == EventType.WORKER_HEARTBEAT
                                    and event.data.get("pool") == settings.pool
                                    and str(run_id) in (event.data.get("in_flight") or [])):
                                held_until = time.monotonic() + listen
                        tg.cancel_scope.cancel()
                if outcome is None:
                    click.echo(f"mq-worker: no worker of pool {settings.pool!r} reports run "
                               f"{run_id}: it has ended already, or it is queued or parked "
                               "(the cancel stays in effect and stops it when it is "
                               "delivered)", err=True)
                    return NOT_HELD
                click.echo(format_event(outcome, color=stdout_color))
                return 0 if outcome.type == EventType.RUN_CANCELLED else 1

    try:
        sys.exit(run(_cancel))
    except TimeoutError:
        fail(f"no terminal event for run {run_id} within {timeout:g} s", 124)
