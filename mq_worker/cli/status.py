"""`mq-worker status`: the live workers, once or kept up to date."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from mq_worker import logs, topology
from mq_worker.cli.common import (
    DURATION,
    URL_HELP,
    client_settings,
    fail,
    quiet_client_logging,
    run,
)
from mq_worker.errors import ConfigurationError


@click.command()
@click.option("--url", "urls", multiple=True, help=URL_HELP)
@click.option("--pool", help="Only this pool's workers. [default: all; env: MQ_WORKER_POOL]")
@click.option("--watch", is_flag=True, help="Keep the table up to date until interrupted.")
@click.option("--listen", type=DURATION, default=1.5, show_default=True,
              help="Without --watch: the longest wait for workers to answer (it returns as "
                   "soon as the answers stop coming).")
@click.option("--json", "as_json", is_flag=True, help="JSON (one object per line with --watch).")
def status(urls: tuple[str, ...], pool: str | None, watch: bool, listen: float,
           as_json: bool) -> None:
    """Show the live workers: name, pool, queues, limit, runs in flight, last seen, state.

    Exits 1 when no live worker answers (without --watch), 2 on a usage error.
    """
    from mq_worker import status as worker_status

    logs.configure("console", "WARNING")
    quiet_client_logging()
    settings = client_settings(urls)
    pool = pool or os.environ.get("MQ_WORKER_POOL") or None
    if pool is not None:
        try:
            topology.check_name("pool", pool)
        except ConfigurationError as exc:
            fail(str(exc), 2)
    terminal = sys.stdout.isatty() and not as_json

    def show(table: worker_status.WorkerTable) -> None:
        if as_json:
            click.echo(json.dumps(table.snapshot()))
            return
        if terminal:
            click.clear()
        click.echo(table.render())
        if not terminal:
            click.echo()

    if watch:
        with contextlib.suppress(KeyboardInterrupt):
            run(lambda: worker_status.watch(settings.url, show, pool=pool, tls=settings.tls,
                                            refresh=1.0 if terminal else None))
        return
    table = run(lambda: worker_status.collect(settings.url, pool=pool, tls=settings.tls,
                                              listen=listen))
    if as_json:
        click.echo(json.dumps(table.snapshot()))
    elif table.workers:
        click.echo(table.render())
    else:
        click.echo("no workers answered", err=True)
    sys.exit(0 if any(r.state == "live" for r in table.rows()) else 1)
