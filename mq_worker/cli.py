"""The `mq-worker` command line."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn
from uuid import UUID

import anyio
import click
from pydantic import ValidationError

from mq_worker import logs, pool_cli, topology
from mq_worker.broker import mask_secrets
from mq_worker.errors import ConfigurationError, MqWorkerError
from mq_worker.events import Event, EventType
from mq_worker.settings import WorkerSettings

_URL_HELP = "Broker address; repeat for a cluster. [env: MQ_WORKER_URL, comma-separated]"


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"mq-worker: {mask_secrets(message)}", err=True)
    sys.exit(code)


def _run(main: Callable[[], Coroutine[Any, Any, Any]], loop: str = "auto") -> Any:
    use_uvloop = loop != "asyncio" and importlib.util.find_spec("uvloop") is not None
    if loop == "uvloop" and not use_uvloop:
        _fail("--loop uvloop needs the 'speed' extra: pip install 'mq-worker[speed]'", 2)
    try:
        return anyio.run(main, backend="asyncio", backend_options={"use_uvloop": use_uvloop})
    except* MqWorkerError as group:
        _fail(str(_first_leaf(group)))


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception of a (possibly nested) group: the one to tell the user."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _client_settings(urls: tuple[str, ...]) -> WorkerSettings:
    try:
        overrides: dict[str, Any] = {"url": list(urls)} if urls else {}
        return WorkerSettings(**overrides)
    except ValidationError as exc:
        _fail(_validation_message(exc), 2)


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"invalid {where}: {first['msg']}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mq-worker")
def main() -> None:
    """A worker that runs jobs pushed over RabbitMQ as local processes."""


# -- start ---------------------------------------------------------------------


@main.command()
@click.option("--url", "url", multiple=True, help=_URL_HELP)
@click.option("--pool", help="Work pool to serve. [default: default]")
@click.option("--queue", "queue", multiple=True, help="Work queue of the pool; repeatable.")
@click.option("--limit", type=int, help="Most runs in flight at once. [default: 4]")
@click.option("--name", help="Worker name. [default: <hostname>-<pid>]")
@click.option("--type", "type_", help="Worker type. [default: process]")
@click.option("--prefetch-seconds", type=float, help="Hold runs due this soon; park later ones.")
@click.option("--heartbeat-seconds", type=float, help="Seconds between heartbeats. [default: 30]")
@click.option("--drain-timeout", type=float, help="On stop, cancel runs still running after it.")
@click.option("--grace-seconds", type=float, help="Default SIGTERM-to-SIGKILL grace on cancel.")
@click.option("--job-template", type=click.Path(dir_okay=False, path_type=Path),
              help="Base job template (JSON).")
@click.option("--signing-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Accept only messages signed with a key from this file.")
@click.option("--allow-command-prefix", multiple=True,
              help="Run only commands under this directory; repeatable.")
@click.option("--max-message-bytes", type=int, help="Larger messages are rejected. [1 MiB]")
@click.option("--outbox-size", type=int, help="Events waiting before intake stops. [10000]")
@click.option("--spool-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep unpublished events in a file here, across restarts.")
@click.option("--delivery-limit", type=int, help="Deliveries before a message is dead-lettered.")
@click.option("--tls-ca-file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tls-cert-file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tls-key-file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--health-port", type=int, help="Serve GET /health and /metrics on this port.")
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]))
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                               case_sensitive=False))
@click.option("--loop", type=click.Choice(["auto", "asyncio", "uvloop"]))
def start(type_: str | None, **options: Any) -> None:
    """Start a worker. Options also come from MQ_WORKER_<OPTION> environment variables."""
    if type_ is not None:
        options["type"] = type_
    overrides = {k: v for k, v in options.items() if v not in (None, ())}
    try:
        settings = WorkerSettings(**overrides)
    except ValidationError as exc:
        _fail(_validation_message(exc), 2)
    logs.configure(settings.log_format, settings.log_level)
    _run(lambda: _serve(settings), settings.loop)


async def _serve(settings: WorkerSettings) -> None:
    from mq_worker.workers.base import worker_class

    try:
        worker = worker_class(settings.type)(settings)
    except ConfigurationError as exc:
        _fail(str(exc), 2)

    async def _signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for _ in received:
                worker.stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(_signals)
        if settings.health_port is not None:
            from mq_worker.health import serve_health

            await tg.start(serve_health, worker, settings.health_port)
        await worker.serve()
        tg.cancel_scope.cancel()


# -- submit and cancel ------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms]?)")
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}


def parse_duration(text: str) -> timedelta:
    """'90', '90s', '5m', '1h30m', '2d' as a timedelta."""
    text = text.strip().lower()
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        raise click.BadParameter(f"not a duration: {text!r} (e.g. 90s, 5m, 1h30m)")
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))


def parse_time(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time; without an offset it is UTC."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an RFC 3339 time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _exit_code(event: Event) -> int:
    if event.type == EventType.RUN_COMPLETED:
        return 0
    if event.type == EventType.RUN_CANCELLED:
        return 130
    if event.type == EventType.RUN_REJECTED:
        return 2
    code = event.data.get("status_code")
    if isinstance(code, int) and code != 0:
        return code if code > 0 else 128 - code
    return 1


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--url", "urls", multiple=True, help=_URL_HELP)
@click.option("--pool", default=topology.DEFAULT_POOL, show_default=True)
@click.option("--queue", default=topology.DEFAULT_QUEUE, show_default=True)
@click.option("--name", help="Run name.")
@click.option("--id", "run_id", type=click.UUID, help="Run id. [default: a new UUID]")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment variable.")
@click.option("--cwd", help="Working directory of the run.")
@click.option("--var", "variables", multiple=True, metavar="KEY=JSON", help="Job variable.")
@click.option("--at", "at", help="Start time (RFC 3339; without offset: UTC).")
@click.option("--in", "in_", help="Start after this long (90s, 5m, 1h30m, 2d).")
@click.option("--wait", is_flag=True, help="Follow the run; exit with its exit code.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after seconds.")
@click.option("--signing-key-file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def submit(
    urls: tuple[str, ...], pool: str, queue: str, name: str | None, run_id: UUID | None,
    env: tuple[str, ...], cwd: str | None, variables: tuple[str, ...], at: str | None,
    in_: str | None, wait: bool, timeout: float | None, signing_key_file: Path | None,
    command: tuple[str, ...],
) -> None:
    """Publish a run of COMMAND (given after --) and print its id."""
    from mq_worker.publisher import new_run

    logs.configure("console", "WARNING")
    settings = _client_settings(urls)
    if at and in_:
        raise click.UsageError("give --at or --in, not both")
    job_variables: dict[str, Any] = {}
    for item in variables:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected KEY=JSON", param_hint="--var")
        try:
            job_variables[key] = json.loads(raw)
        except json.JSONDecodeError:
            job_variables[key] = raw
    if env:
        pairs = [e.partition("=") for e in env]
        if any(not sep for _, sep, _ in pairs):
            raise click.BadParameter("expected KEY=VALUE", param_hint="--env")
        job_variables["env"] = {k: v for k, _, v in pairs}
    if cwd:
        job_variables["working_dir"] = cwd
    start_time = parse_time(at) if at else (
        datetime.now(UTC) + parse_duration(in_) if in_ else None
    )
    try:
        run = new_run(
            shlex.join(command), name=name, job_variables=job_variables,
            scheduled_start_time=start_time, **({"id": run_id} if run_id else {}),
        )
    except ValidationError as exc:
        _fail(_validation_message(exc), 2)

    async def _submit() -> int:
        from mq_worker.publisher import Publisher
        from mq_worker.subscriber import EventSubscriber

        async with Publisher(settings.url, tls=settings.tls,
                             signing_key_file=signing_key_file) as publisher:
            if not wait:
                await publisher.submit(run, pool=pool, queue=queue)
                click.echo(str(run.id))
                return 0
            async with EventSubscriber(settings.url, tls=settings.tls, run_id=run.id) as events:
                await publisher.submit(run, pool=pool, queue=queue)
                click.echo(str(run.id))
                with anyio.fail_after(timeout if timeout is not None else float("inf")):
                    async for event in events:
                        click.echo(format_event(event, color=sys.stderr.isatty()), err=True)
                        if event.is_terminal:
                            return _exit_code(event)
        return 1

    try:
        sys.exit(_run(_submit))
    except TimeoutError:
        _fail(f"run {run.id} did not end within {timeout} s", 124)


@main.command()
@click.argument("run_id", type=click.UUID)
@click.option("--url", "urls", multiple=True, help=_URL_HELP)
@click.option("--pool", default=topology.DEFAULT_POOL, show_default=True)
@click.option("--reason", help="Why; carried in the cancelled event.")
@click.option("--wait", is_flag=True, help="Wait for the run's terminal event.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after seconds.")
@click.option("--signing-key-file", type=click.Path(dir_okay=False, path_type=Path))
def cancel(
    run_id: UUID, urls: tuple[str, ...], pool: str, reason: str | None, wait: bool,
    timeout: float | None, signing_key_file: Path | None,
) -> None:
    """Cancel RUN_ID wherever it is: running, held, queued, parked or not yet published."""
    logs.configure("console", "WARNING")
    settings = _client_settings(urls)

    async def _cancel() -> int:
        from mq_worker.publisher import Publisher
        from mq_worker.subscriber import EventSubscriber

        async with Publisher(settings.url, tls=settings.tls,
                             signing_key_file=signing_key_file) as publisher:
            if not wait:
                await publisher.cancel(run_id, pool=pool, reason=reason)
                return 0
            async with EventSubscriber(settings.url, tls=settings.tls, run_id=run_id) as events:
                await publisher.cancel(run_id, pool=pool, reason=reason)
                with anyio.fail_after(timeout if timeout is not None else float("inf")):
                    async for event in events:
                        if event.is_terminal:
                            click.echo(format_event(event, color=sys.stdout.isatty()))
                            return 0 if event.type == EventType.RUN_CANCELLED else 1
        return 1

    try:
        sys.exit(_run(_cancel))
    except TimeoutError:
        _fail(f"no terminal event for run {run_id} within {timeout} s", 124)


# -- events ------------------------------------------------------------------------

_COLORS = {
    "pending": "blue", "submitted": "cyan", "completed": "green", "crashed": "red",
    "cancelled": "yellow", "rejected": "magenta", "lost": "red",
}
_DETAILS = ("status_code", "reason", "message", "infrastructure_pid", "late_by_seconds",
            "free_slots", "in_flight")


def format_event(event: Event, *, color: bool = False) -> str:
    """One readable line for an event."""
    short = event.type.removeprefix("mq_worker.")
    kind = short.rsplit(".", 1)[-1]
    label = f"{short:<17}"
    if color:
        label = click.style(label, fg=_COLORS.get(kind), bold=True)
    when = event.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
    data = event.data
    parts = [when, label, event.subject or "-"]
    if data.get("run_name"):
        parts.append(f"name={data['run_name']}")
    if short.startswith("run."):
        parts.append(f"worker={data.get('worker')}")
    for key in _DETAILS:
        value = data.get(key)
        if value not in (None, [], ""):
            if key == "in_flight":
                value = len(value)
            parts.append(f"{key}={value}")
    return "  ".join(str(p) for p in parts)


@main.command()
@click.option("--url", "urls", multiple=True, help=_URL_HELP)
@click.option("--run", "run_id", type=click.UUID, help="Only this run's events.")
@click.option("--type", "types", multiple=True, help="Only these event types (routing keys).")
@click.option("--json", "as_json", is_flag=True, help="One CloudEvent JSON per line.")
def events(urls: tuple[str, ...], run_id: UUID | None, types: tuple[str, ...],
           as_json: bool) -> None:
    """Tail lifecycle events as they are published."""
    logs.configure("console", "WARNING")
    settings = _client_settings(urls)

    async def _tail() -> None:
        from mq_worker.subscriber import EventSubscriber

        color = sys.stdout.isatty()
        async with EventSubscriber(settings.url, tls=settings.tls, types=types or None,
                                   run_id=run_id) as subscription:
            async for event in subscription:
                line = event.model_dump_json() if as_json else format_event(event, color=color)
                click.echo(line)

    with contextlib.suppress(KeyboardInterrupt):
        _run(_tail)


# -- status ------------------------------------------------------------------------


@main.command()
@click.option("--url", "urls", multiple=True, help=_URL_HELP)
@click.option("--pool", help="Only this pool's workers.")
@click.option("--watch", is_flag=True, help="Keep the table up to date until interrupted.")
@click.option("--listen", type=float, default=1.5, show_default=True,
              help="Without --watch: seconds to wait for workers to answer.")
@click.option("--json", "as_json", is_flag=True, help="JSON (one object per line with --watch).")
def status(urls: tuple[str, ...], pool: str | None, watch: bool, listen: float,
           as_json: bool) -> None:
    """Show the live workers: name, pool, queues, limit, runs in flight, last seen, state.

    Exits 1 when no live worker answers (without --watch).
    """
    from mq_worker import status as worker_status

    logs.configure("console", "WARNING")
    settings = _client_settings(urls)
    if pool is not None:
        try:
            topology.check_name("pool", pool)
        except ConfigurationError as exc:
            _fail(str(exc), 2)
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
            _run(lambda: worker_status.watch(settings.url, show, pool=pool, tls=settings.tls,
                                             refresh=1.0 if terminal else None))
        return
    table = _run(lambda: worker_status.collect(settings.url, pool=pool, tls=settings.tls,
                                               listen=listen))
    if as_json:
        click.echo(json.dumps(table.snapshot()))
    elif table.workers:
        click.echo(table.render())
    else:
        click.echo("no workers answered", err=True)
    sys.exit(0 if any(r.state == "live" for r in table.rows()) else 1)


# -- schema ------------------------------------------------------------------------


@main.command()
@click.argument("name", required=False)
@click.option("--asyncapi", "as_asyncapi", is_flag=True,
              help="Print the whole AsyncAPI 3.0 document (YAML).")
@click.option("--list", "as_list", is_flag=True, help="List the schema names.")
def schema(name: str | None, as_asyncapi: bool, as_list: bool) -> None:
    """Print the JSON Schemas of the wire messages (all, or NAME: run, cancel, event, or an
    event type such as run.completed)."""
    from mq_worker import schema as contract

    if as_asyncapi:
        click.echo(contract.asyncapi_yaml(), nl=False)
    elif as_list:
        click.echo("\n".join(contract.schema_names()))
    elif name is None:
        click.echo(json.dumps(contract.json_schemas(), indent=2))
    else:
        try:
            click.echo(json.dumps(contract.json_schema(name), indent=2))
        except KeyError:
            _fail(f"no schema named {name!r}; known: {', '.join(contract.schema_names())}", 2)


pool_cli.register(main)  # limit, pause, resume

if __name__ == "__main__":
    main()
