"""`mq-worker submit`: publish a run, optionally follow it to its end."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import click
from pydantic import ValidationError

from mq_worker import logs, topology
from mq_worker.cli.common import (
    DURATION,
    DURATION_EXAMPLES,
    URL_HELP,
    client_settings,
    color_option,
    color_wanted,
    fail,
    quiet_client_logging,
    run,
    validation_message,
    warn,
)
from mq_worker.cli.events import format_event
from mq_worker.events import Event, EventType
from mq_worker.settings import ClientSettings

EXIT_CODES = """\b
Exit codes with --wait:
  0    the run completed
  N    the run crashed with exit code N (128+S when killed by signal S)
  1    the run crashed without an exit code, or an error
  2    a usage error, or the worker rejected the run
  124  --timeout passed before the run ended
  130  the run was cancelled"""


def parse_time(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time; without an offset it is UTC."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an RFC 3339 time: {text!r}",
                                 param_hint="'--at'") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def exit_code(event: Event) -> int:
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


def _job_variables(variables: tuple[str, ...], env: tuple[str, ...],
                   cwd: str | None) -> dict[str, Any]:
    job_variables: dict[str, Any] = {}
    for item in variables:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=JSON", param_hint="'--var'")
        try:
            job_variables[key] = json.loads(raw)
        except json.JSONDecodeError:
            job_variables[key] = raw
    if env:
        pairs = [e.partition("=") for e in env]
        bad = [e for e, (key, sep, _) in zip(env, pairs, strict=True) if not sep or not key]
        if bad:
            raise click.BadParameter(f"{bad[0]!r}: expected KEY=VALUE", param_hint="'--env'")
        job_variables["env"] = {k: v for k, _, v in pairs}
    if cwd:
        job_variables["working_dir"] = cwd
    return job_variables


async def consumer_count(settings: ClientSettings, pool: str, queue: str) -> int | None:
    """How many consumers the work queue (pool, queue) has now; None if it cannot be told."""
    from mq_worker.broker import Link

    link = Link(settings.url, name="mq_worker submit", tls=settings.tls,
                publisher_confirms=False)
    try:
        channel = await link.channel()
        declared = await channel.queue_declare(topology.work_queue_name(pool, queue),
                                               passive=True)
        return int(declared.consumer_count or 0)
    except Exception:  # the run is published; this is only a hint
        return None
    finally:
        await link.close()


async def tell_if_unserved(settings: ClientSettings, pool: str, queue: str) -> None:
    if await consumer_count(settings, pool, queue) == 0:
        warn(f"no worker is serving pool {pool!r} (queue {queue!r}) right now; the run "
             "waits in the queue until one starts: mq-worker start "
             f"--pool {pool} --queue {queue}")


@click.command(context_settings={"allow_interspersed_args": False},
               epilog=EXIT_CODES)
@click.option("--url", "urls", multiple=True, help=URL_HELP)
@click.option("--pool", help="Work pool to publish to. [default: default; env: MQ_WORKER_POOL]")
@click.option("--queue", help="Work queue of the pool. [default: default; env: MQ_WORKER_QUEUE, "
              "its first item]")
@click.option("--name", help="Run name. [default: none]")
@click.option("--id", "run_id", type=click.UUID, help="Run id. [default: a new UUID]")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE",
              help="Environment variable of the run; repeatable.")
@click.option("--cwd", help="Working directory of the run. [default: the worker's]")
@click.option("--var", "variables", multiple=True, metavar="KEY=JSON",
              help="Job variable (JSON, or else a string); repeatable.")
@click.option("--at", "at", metavar="TIME",
              help="Start time (RFC 3339; without offset: UTC). [default: now]")
@click.option("--in", "in_", type=DURATION,
              help=f"Start after this long ({DURATION_EXAMPLES}). [default: now]")
@click.option("--wait", is_flag=True,
              help="Follow the run's events; exit with its outcome (see below).")
@click.option("--timeout", type=DURATION, default=None,
              help="With --wait: give up after this long (exit 124). [default: none]")
@click.option("--logs", "show_logs", is_flag=True,
              help="With --wait: print the run's output to stderr as it comes.")
@click.option("--signing-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Sign the run with this key. [env: MQ_WORKER_SIGNING_KEY_FILE]")
@click.option("--traceparent", envvar="TRACEPARENT",
              help="W3C traceparent carried to the run's events and process. "
                   "[env: TRACEPARENT, so a run that submits runs passes its own on]")
@color_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def submit(
    urls: tuple[str, ...], pool: str | None, queue: str | None, name: str | None,
    run_id: UUID | None, env: tuple[str, ...], cwd: str | None, variables: tuple[str, ...],
    at: str | None, in_: float | None, wait: bool, timeout: float | None, show_logs: bool,
    signing_key_file: Path | None, traceparent: str | None, color: bool | None,
    command: tuple[str, ...],
) -> None:
    """Publish a run of COMMAND and print its id.

    Options go before `--`; everything after it is the command, run without a shell:

        mq-worker submit --wait -- echo hello
    """
    from mq_worker.publisher import new_run

    logs.configure("console", "WARNING")
    quiet_client_logging()
    settings = client_settings(urls, pool=pool, queue=queue, signing_key_file=signing_key_file)
    if at and in_ is not None:
        raise click.UsageError("give --at or --in, not both")
    job_variables = _job_variables(variables, env, cwd)
    start_time = parse_time(at) if at else (
        datetime.now(UTC) + timedelta(seconds=in_) if in_ is not None else None
    )
    try:
        message = new_run(
            list(command), name=name, job_variables=job_variables,
            scheduled_start_time=start_time, traceparent=traceparent or None,
            **({"id": run_id} if run_id else {}),
        )
    except ValidationError as exc:
        fail(validation_message(exc), 2)
    stderr_color = color_wanted(color, sys.stderr)

    async def _submit() -> int:
        from mq_worker.ledger import commands as ledger_commands
        from mq_worker.ledger.follow import AFTER_END_GRACE_SECONDS, printing_output
        from mq_worker.publisher import Publisher
        from mq_worker.subscriber import EventSubscriber

        async with Publisher(settings.url, tls=settings.tls,
                             signing_key_file=settings.signing_key_file) as publisher:
            if not wait:
                await publisher.submit(message, pool=settings.pool, queue=settings.queue)
                click.echo(str(message.id))
                await tell_if_unserved(settings, settings.pool, settings.queue)
                return 0
            async with EventSubscriber(settings.url, tls=settings.tls,
                                       run_id=message.id) as events, \
                    printing_output(settings.url, message.id,
                                    ledger_commands.output_printer(err=True),
                                    enabled=show_logs, tls=settings.tls) as output:
                await publisher.submit(message, pool=settings.pool, queue=settings.queue)
                click.echo(str(message.id))
                await tell_if_unserved(settings, settings.pool, settings.queue)
                with anyio.fail_after(timeout if timeout is not None else float("inf")):
                    async for event in events:
                        if event.is_terminal and output is not None:
                            # Output and events come on queues of their own: the outcome
                            # is printed after the output, not between its lines.
                            with anyio.move_on_after(AFTER_END_GRACE_SECONDS + 1):
                                await output.wait_complete()
                        click.echo(format_event(event, color=stderr_color), err=True)
                        if event.is_terminal:
                            return exit_code(event)
        return 1

    try:
        sys.exit(run(_submit))
    except TimeoutError:
        fail(f"run {message.id} did not end within {timeout:g} s", 124)
