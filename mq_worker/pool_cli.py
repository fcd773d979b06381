"""`mq-worker limit set/ls/rm`, `mq-worker pause` and `mq-worker resume`."""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import anyio
import click
from pydantic import ValidationError

from mq_worker import logs, pool_admin
from mq_worker.broker import mask_secrets
from mq_worker.errors import MqWorkerError
from mq_worker.settings import WorkerSettings

_URL_HELP = "Broker address; repeat for a cluster. [env: MQ_WORKER_URL, comma-separated]"
_TARGET_HELP = "TARGET is pool:<pool>, queue:<pool>/<queue> or key:<key> (key:deployment:<id>, " \
               "key:tag:<tag>, or a run's concurrency_key)."


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"mq-worker: {mask_secrets(message)}", err=True)
    sys.exit(code)


def _settings(urls: tuple[str, ...]) -> WorkerSettings:
    try:
        overrides: dict[str, Any] = {"url": list(urls)} if urls else {}
        return WorkerSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        _fail(f"invalid {'.'.join(str(p) for p in first['loc'])}: {first['msg']}", 2)


def _call(make: Callable[[WorkerSettings], Coroutine[Any, Any, Any]],
          urls: tuple[str, ...]) -> Any:
    logs.configure("console", "WARNING")
    settings = _settings(urls)
    try:
        return anyio.run(make, settings)
    except* MqWorkerError as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        _fail(str(first), 2 if isinstance(first, ValueError) else 1)


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


@click.group(epilog=_TARGET_HELP)
def limit() -> None:
    """Shared concurrency limits across every worker of the vhost."""


@limit.command("set")
@click.argument("target")
@click.argument("value", type=click.IntRange(0, 100_000))
@click.option("--url", "urls", multiple=True, help=_URL_HELP)
def limit_set(target: str, value: int, urls: tuple[str, ...]) -> None:
    """At most VALUE runs of TARGET at once; takes effect at once on every worker."""
    async def _set(settings: WorkerSettings) -> None:
        await pool_admin.set_limit(settings.url, target, value, tls=settings.tls, by=_who())

    _call(_set, urls)
    click.echo(f"{target}: limit {value}")


@limit.command("rm")
@click.argument("target")
@click.option("--url", "urls", multiple=True, help=_URL_HELP)
def limit_rm(target: str, urls: tuple[str, ...]) -> None:
    """Remove the limit of TARGET; runs waiting for it go back to their queues."""
    async def _rm(settings: WorkerSettings) -> bool:
        return await pool_admin.remove_limit(settings.url, target, tls=settings.tls, by=_who())

    if not _call(_rm, urls):
        _fail(f"no limit on {target}")
    click.echo(f"{target}: no limit")


@limit.command("ls")
@click.option("--url", "urls", multiple=True, help=_URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per limit.")
def limit_ls(urls: tuple[str, ...], as_json: bool) -> None:
    """List limits: the limit, slots in use and runs waiting."""
    async def _ls(settings: WorkerSettings) -> list[pool_admin.LimitUsage]:
        return await pool_admin.list_limits(settings.url, tls=settings.tls)

    usages: list[pool_admin.LimitUsage] = _call(_ls, urls)
    if as_json:
        for usage in usages:
            click.echo(json.dumps({"target": usage.target, "limit": usage.limit,
                                   "in_use": usage.in_use, "waiting": usage.waiting}))
        return
    width = max([len("TARGET"), *(len(u.target) for u in usages)])
    click.echo(f"{'TARGET':<{width}}  {'LIMIT':>6}  {'IN USE':>6}  {'WAITING':>7}")
    for usage in usages:
        click.echo(f"{usage.target:<{width}}  {usage.limit:>6}  {usage.in_use:>6}  "
                   f"{usage.waiting:>7}")


def _pause_command(resume: bool) -> click.Command:
    verb = "resume" if resume else "pause"

    @click.command(verb, epilog="TARGET is pool:<pool> or queue:<pool>/<queue>.")
    @click.argument("target", required=False)
    @click.option("--url", "urls", multiple=True, help=_URL_HELP)
    def command(target: str | None, urls: tuple[str, ...]) -> None:
        async def _do(settings: WorkerSettings) -> list[str]:
            if target is None:
                return await pool_admin.list_paused(settings.url, tls=settings.tls)
            await pool_admin.pause(settings.url, target, tls=settings.tls, by=_who(),
                                   resume=resume)
            return []

        paused: list[str] = _call(_do, urls)
        if target is None:
            click.echo("\n".join(paused) if paused else "nothing is paused")
        else:
            click.echo(f"{target}: {'resumed' if resume else 'paused'}")

    command.help = (
        "Restart intake of TARGET on every worker (without TARGET: list what is paused)."
        if resume else
        "Stop intake of TARGET on every worker; running runs go on "
        "(without TARGET: list what is paused)."
    )
    return command


pause = _pause_command(resume=False)
resume = _pause_command(resume=True)


def register(group: click.Group) -> None:
    for command in (limit, pause, resume):
        group.add_command(command)
