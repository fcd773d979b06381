"""The ledger's commands: `ledger` (the service), `runs`, `run` and `logs`."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn
from uuid import UUID

import anyio
import click

from mq_worker import logs as logging_setup
from mq_worker.dashboard.commands import dashboard_options, http_options, http_settings
from mq_worker.errors import ConfigurationError, MqWorkerError
from mq_worker.ledger.database import default_db_url, redact
from mq_worker.ledger.records import STATES, OutputLine, RunRecord, iso
from mq_worker.topology import EVENT_TYPE_PREFIX

_DB_HELP = ("Ledger database: sqlite:///PATH or postgresql://... "
            "[env: MQ_WORKER_LEDGER_DB; default: an SQLite file in ~/.local/share/mq-worker]")
_URL_HELP = "Broker address; repeat for a cluster. [env: MQ_WORKER_URL, comma-separated]"


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"mq-worker: {redact(message)}", err=True)
    sys.exit(code)


def _broker(urls: tuple[str, ...]) -> Any:
    from mq_worker.settings import WorkerSettings

    overrides: dict[str, Any] = {"url": list(urls)} if urls else {}
    try:
        return WorkerSettings(**overrides)
    except ValueError as exc:
        _fail(f"invalid --url: {exc}", 2)


def _open_for_reading(db: str | None) -> Any:
    """The ledger at `db` (or the default), which must exist and have its schema."""
    from mq_worker.ledger.store import LedgerStore

    url = db or default_db_url()
    path = url.removeprefix("sqlite://").removeprefix("/") if url.startswith("sqlite://") else (
        None if "://" in url else url)
    if path is not None and path != ":memory:" and not Path(path).expanduser().exists():
        _fail(f"no ledger database at {path}: start one with `mq-worker ledger --db {url}`")
    try:
        store = LedgerStore(url)
        if store.schema_version() == 0:
            _fail(f"{url} is not a ledger database yet: start `mq-worker ledger --db {url}`")
    except ConfigurationError as exc:
        _fail(str(exc), 2)
    return store


def _since(text: str) -> float:
    from mq_worker.cli import parse_duration, parse_time

    try:
        return time.time() - parse_duration(text).total_seconds()
    except click.BadParameter:
        return parse_time(text).timestamp()


def register(main: click.Group) -> None:
    """Add the ledger's commands to the `mq-worker` group."""
    for command in (ledger, runs, run, logs):
        main.add_command(command)


# -- ledger ----------------------------------------------------------------------------


@click.command()
@click.option("--url", "urls", multiple=True, help=_URL_HELP)
@click.option("--db", help=_DB_HELP)
@click.option("--keep-days", type=float, default=30.0, show_default=True,
              envvar="MQ_WORKER_LEDGER_KEEP_DAYS",
              help="Delete runs that ended longer ago than this; 0 keeps everything.")
@click.option("--prune-interval", type=click.FloatRange(min=0.1), default=3600.0,
              show_default=True, help="Seconds between two prunings of old runs.")
@click.option("--max-output-bytes", type=int, default=10 * 1024 * 1024, show_default=True,
              help="Output kept per run; then one truncation marker.")
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto",
              envvar="MQ_WORKER_LOG_FORMAT")
@click.option("--log-level", default="INFO", envvar="MQ_WORKER_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@http_options()
def ledger(urls: tuple[str, ...], db: str | None, keep_days: float, prune_interval: float,
           max_output_bytes: int, log_format: str, log_level: str, **http: Any) -> None:
    """Record every run (events, times, outcome, output) into a database, until stopped.

    With --http-port, also serve the web dashboard over it."""
    from mq_worker.ledger.service import LedgerOptions, LedgerService

    logging_setup.configure(log_format, log_level.upper())  # type: ignore[arg-type]
    settings = _broker(urls)
    options = LedgerOptions(urls=settings.url, db=db or default_db_url(), keep_days=keep_days,
                            prune_interval_seconds=prune_interval,
                            max_output_bytes=max_output_bytes, tls=settings.tls)
    service = LedgerService(options)
    web = http_settings(http)
    board = dashboard_options(web, settings, options.db) if web.port is not None else None

    async def _serve() -> None:
        async with anyio.create_task_group() as tg:
            async def _signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                    async for _ in received:
                        service.stop()

            tg.start_soon(_signals)
            if board is not None:
                from mq_worker.dashboard.app import serve_dashboard

                tg.start_soon(serve_dashboard, board)
            await service.serve()
            tg.cancel_scope.cancel()

    try:
        anyio.run(_serve)
    except* MqWorkerError as group:
        _fail(str(group.exceptions[0]), 2)
    except* OSError as group:
        _fail(f"cannot serve the dashboard: {group.exceptions[0]}", 2)


# -- runs and run -------------------------------------------------------------------------


def _short_time(when: float | None) -> str:
    return datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S") if when else "-"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _table(rows: list[RunRecord]) -> str:
    header = ("ID", "NAME", "STATE", "CODE", "POOL/QUEUE", "WORKER", "CREATED", "DURATION")
    lines = [header] + [
        (r.id, (r.name or "-")[:24], r.state, "-" if r.status_code is None else str(r.status_code),
         f"{r.pool or '-'}/{r.queue or '-'}", (r.worker or "-")[:24], _short_time(r.created_at),
         _seconds(r.duration_seconds))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


@click.command()
@click.option("--db", help=_DB_HELP)
@click.option("--state", "states", multiple=True, type=click.Choice(STATES),
              help="Only runs in this state; repeatable.")
@click.option("--pool", help="Only this pool's runs.")
@click.option("--queue", help="Only this queue's runs.")
@click.option("--worker", help="Only runs of this worker.")
@click.option("--deployment", help="Only runs of this deployment id.")
@click.option("--since", help="Only runs since this long ago (90s, 5m, 1h, 2d) or this time.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--before", help="The cursor printed for the next page (keyset pagination).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array of runs.")
@click.option("--json-lines", "as_json_lines", is_flag=True, help="One JSON run per line.")
def runs(db: str | None, states: tuple[str, ...], pool: str | None, queue: str | None,
         worker: str | None, deployment: str | None, since: str | None, limit: int,
         before: str | None, as_json: bool, as_json_lines: bool) -> None:
    """List runs from the ledger, newest first."""
    store = _open_for_reading(db)
    with store:
        page = store.list_runs(state=list(states) or None, pool=pool, queue=queue,
                               worker=worker, deployment=deployment,
                               since=_since(since) if since else None, limit=limit,
                               before=before)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in page.runs], indent=2))
    elif as_json_lines:
        for record in page.runs:
            click.echo(json.dumps(record.as_dict()))
    elif page.runs:
        click.echo(_table(page.runs))
    else:
        click.echo("no runs", err=True)
    if page.next_cursor and not (as_json or as_json_lines):
        click.echo(f"more: --before '{page.next_cursor}'", err=True)


@click.command(name="run")
@click.argument("run_id")
@click.option("--db", help=_DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="The run with its events, as JSON.")
def run(run_id: str, db: str | None, as_json: bool) -> None:
    """Show one run from the ledger: its state, times and every event in order."""
    store = _open_for_reading(db)
    with store:
        record = store.get_run(run_id)
    if record is None:
        _fail(f"run {run_id} is not in the ledger")
    if as_json:
        click.echo(json.dumps(record.as_dict(with_events=True), indent=2))
        return
    details = record.as_dict()
    for key in ("id", "name", "state", "status_code", "reason", "message", "pool", "queue",
                "worker", "flow_name", "deployment_name", "tags", "infrastructure_pid",
                "scheduled_start_time", "pending_at", "submitted_at", "ended_at",
                "start_delay_seconds", "duration_seconds", "output_lines"):
        if details[key] not in (None, [], ""):
            click.echo(f"{key + ':':<22}{details[key]}")
    click.echo("events:")
    for event in record.events:
        data = event.data
        extra = "  ".join(f"{k}={data[k]}" for k in ("status_code", "reason", "message",
                                                      "infrastructure_pid") if data.get(k))
        click.echo(f"  {iso(event.time)}  {event.type.removeprefix(EVENT_TYPE_PREFIX):<14}"
                   f"  worker={data.get('worker')}  {extra}".rstrip())


# -- logs ---------------------------------------------------------------------------------


def output_printer(as_json: bool = False, *, err: bool = False) -> Callable[[OutputLine], None]:
    def show(line: OutputLine) -> None:
        if as_json:
            click.echo(json.dumps(line.as_dict()), err=err)
        elif line.stream == "ledger":
            click.echo(line.text, err=True)
        else:
            click.echo(line.text, err=err)
        with contextlib.suppress(OSError, ValueError):
            (sys.stderr if err else sys.stdout).flush()

    return show


@click.command()
@click.argument("run_id", type=click.UUID)
@click.option("--db", help=_DB_HELP)
@click.option("--follow", "-f", is_flag=True,
              help="Stream the run's output live; exit 0 when the run ends.")
@click.option("--url", "urls", multiple=True, help=_URL_HELP + " With --follow.")
@click.option("--timeout", type=float, default=None, help="With --follow: give up after seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per output line.")
def logs(run_id: UUID, db: str | None, follow: bool, urls: tuple[str, ...],
         timeout: float | None, as_json: bool) -> None:
    """Print a run's output: stored in the ledger, or live with --follow."""
    logging_setup.configure("console", "WARNING")
    show = output_printer(as_json)
    if not follow:
        store = _open_for_reading(db)
        with store:
            record = store.get_run(str(run_id))
            if record is None:
                _fail(f"run {run_id} is not in the ledger")
            for line in store.get_output(str(run_id)):
                show(line)
        return
    settings = _broker(urls)
    stored_db = db or _existing_default_db()

    async def _follow() -> int:
        from mq_worker.ledger.follow import OutputFollower

        async with OutputFollower(settings.url, run_id, show, tls=settings.tls) as follower:
            with anyio.fail_after(timeout if timeout is not None else float("inf")):
                if stored_db is None:
                    await follower.follow()
                else:
                    await _follow_with_ledger(follower, stored_db, str(run_id))
        return 0

    try:
        code = anyio.run(_follow)
    except* TimeoutError:
        _fail(f"run {run_id} did not end within {timeout} s", 124)
    except* MqWorkerError as group:
        _fail(str(group.exceptions[0]), 2)
    sys.exit(code)


def _existing_default_db() -> str | None:
    """MQ_WORKER_LEDGER_DB, or the default SQLite ledger if there is one."""
    import os

    from mq_worker.ledger.database import default_sqlite_path

    if os.environ.get("MQ_WORKER_LEDGER_DB"):
        return os.environ["MQ_WORKER_LEDGER_DB"]
    return f"sqlite:///{default_sqlite_path()}" if default_sqlite_path().exists() else None


async def _follow_with_ledger(follower: Any, db: str, run_id: str) -> None:
    """What the ledger has first, then live output; stops also when the ledger sees the end.

    The ledger covers what was printed before this command subscribed, and a
    run that ended in the meantime (its terminal event was published before).
    """
    from mq_worker.ledger.follow import AFTER_END_GRACE_SECONDS
    from mq_worker.ledger.store import AsyncLedgerStore

    store = AsyncLedgerStore(_open_for_reading(db))
    try:
        for batch in await store.get_output_batches(run_id):
            follower.show(batch)
        record = await store.get_run(run_id)
        if record is not None and record.ended_at is not None:
            return
        async with anyio.create_task_group() as tg:
            async def _live() -> None:
                await follower.follow()
                tg.cancel_scope.cancel()

            tg.start_soon(_live)
            while True:
                await anyio.sleep(1.0)
                record = await store.get_run(run_id)
                if record is not None and record.ended_at is not None:
                    await anyio.sleep(AFTER_END_GRACE_SECONDS)
                    for batch in await store.get_output_batches(run_id):
                        follower.show(batch)
                    tg.cancel_scope.cancel()
    finally:
        await store.close()
