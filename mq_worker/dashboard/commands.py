"""The dashboard's command-line options, shared by `mq-worker ledger` and `mq-worker dashboard`."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class HttpOptions:
    port: int | None
    host: str
    auth_file: Path | None
    management_url: str | None


def http_options(always_served: bool = False) -> Callable[[F], F]:
    """Add --http-port, --http-host, --auth-file and --management-url to a command; a command
    that always serves gets a default port."""

    def decorate(command: F) -> F:
        for option in reversed([
            click.option("--http-port", type=click.IntRange(0, 65535),
                         envvar="MQ_WORKER_HTTP_PORT", default=8080 if always_served else None,
                         show_default=always_served,
                         help="Serve the web dashboard on this port. "
                              "[env: MQ_WORKER_HTTP_PORT]"),
            click.option("--http-host", default="127.0.0.1", show_default=True,
                         envvar="MQ_WORKER_HTTP_HOST",
                         help="Address the dashboard binds; another than loopback needs "
                              "--auth-file. [env: MQ_WORKER_HTTP_HOST]"),
            click.option("--auth-file", type=click.Path(dir_okay=False, path_type=Path),
                         envvar="MQ_WORKER_AUTH_FILE",
                         help="A file whose first line is the dashboard's secret: a bearer "
                              "token, or the password of basic authentication. "
                              "[env: MQ_WORKER_AUTH_FILE]"),
            click.option("--management-url", envvar="MQ_WORKER_MANAGEMENT_URL",
                         help="RabbitMQ's management API for queue depths "
                              "[default: port 15672 of the broker's host; passive declares "
                              "when it does not answer]"),
        ]):
            command = option(command)
        return command

    return decorate


def http_settings(kwargs: dict[str, Any]) -> HttpOptions:
    """Take the dashboard's options out of a command's keyword arguments."""
    return HttpOptions(kwargs.pop("http_port"), kwargs.pop("http_host"),
                       kwargs.pop("auth_file"), kwargs.pop("management_url"))


def dashboard_options(http: HttpOptions, settings: Any, db: str) -> Any:
    """The DashboardOptions (imported only now: aiohttp and jinja2 are the extra's)."""
    try:
        from mq_worker.dashboard.app import DashboardOptions
    except ImportError as exc:
        click.echo(f"mq-worker: the dashboard needs its extra ({exc.name} is missing): "
                   "pip install 'mq-worker[dashboard]'", err=True)
        sys.exit(2)
    assert http.port is not None
    return DashboardOptions(urls=settings.url, db=db, host=http.host, port=http.port,
                            auth_file=http.auth_file, management_url=http.management_url,
                            signing_key_file=settings.signing_key_file, tls=settings.tls)


@click.command()
@click.option("--url", "urls", multiple=True,
              help="Broker address; repeat for a cluster. [env: MQ_WORKER_URL, comma-separated]")
@click.option("--db", help="Ledger database: sqlite:///PATH or postgresql://... "
                           "[env: MQ_WORKER_LEDGER_DB]")
@click.option("--signing-key-file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="MQ_WORKER_SIGNING_KEY_FILE",
              help="Sign the cancels, runs and replays the dashboard publishes.")
@http_options(always_served=True)
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto")
@click.option("--log-level", default="INFO",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def dashboard(urls: tuple[str, ...], db: str | None, signing_key_file: Path | None,
              log_format: str, log_level: str, **kwargs: Any) -> None:
    """Serve the web dashboard over a ledger that `mq-worker ledger` records, until stopped."""
    from mq_worker import logs as logging_setup
    from mq_worker.errors import MqWorkerError
    from mq_worker.ledger.commands import _broker, _fail
    from mq_worker.ledger.database import default_db_url

    logging_setup.configure(log_format, log_level.upper())  # type: ignore[arg-type]
    settings = _broker(urls)
    if signing_key_file is not None:
        settings = settings.model_copy(update={"signing_key_file": signing_key_file})
    options = dashboard_options(http_settings(kwargs), settings, db or default_db_url())
    from mq_worker.dashboard.app import serve_dashboard

    async def _serve() -> None:
        async with anyio.create_task_group() as tg:
            async def _signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                    async for _ in received:
                        tg.cancel_scope.cancel()

            tg.start_soon(_signals)
            await serve_dashboard(options)

    try:
        anyio.run(_serve)
    except* MqWorkerError as group:
        _fail(str(group.exceptions[0]), 2)
    except* OSError as group:
        _fail(f"cannot serve the dashboard: {group.exceptions[0]}", 2)
