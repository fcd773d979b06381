"""What every command shares: failing clearly, running the event loop quietly, colours,
durations, client settings from the environment."""

from __future__ import annotations

import asyncio
import difflib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Coroutine, Iterable
from datetime import timedelta
from typing import Any, NoReturn

import anyio
import click
from pydantic import ValidationError

from mq_worker.broker import mask_secrets
from mq_worker.errors import MqWorkerError
from mq_worker.settings import (
    ENV_PREFIX,
    RUN_ENVIRONMENT,
    ClientSettings,
    WorkerSettings,
)

URL_HELP = "Broker address; repeat for a cluster. [env: MQ_WORKER_URL, comma-separated]"
# Reserved for the project's own tests and benchmarks (their broker's host and port).
_RESERVED_PREFIXES = (ENV_PREFIX + "TEST_", ENV_PREFIX + "BENCH_")


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"mq-worker: {mask_secrets(message)}", err=True)
    sys.exit(code)


def warn(message: str) -> None:
    click.echo(f"mq-worker: warning: {message}", err=True)


def validation_message(exc: ValidationError) -> str:
    """The first error of a settings or message model, as one line without pydantic's
    internal prefixes."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if not where or message.startswith("invalid "):
        return message
    return f"invalid {where}: {message}"


# -- the event loop --------------------------------------------------------------


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Drop asyncio's "exception was never retrieved" reports: aiormq leaves such futures
    behind when a connection closes (a known aiormq issue); for a command that has already
    told the user its outcome they are noise that reads like a crash."""
    if "never retrieved" in str(context.get("message", "")):
        logging.getLogger("mq_worker.cli").debug("dropped: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


class _NeverRetrievedFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "never retrieved" not in record.getMessage()


def quiet_client_logging() -> None:
    """Client commands print their own clean messages; the libraries' duplicates go."""
    logging.getLogger("asyncio").addFilter(_NeverRetrievedFilter())
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def run(main: Callable[[], Coroutine[Any, Any, Any]], loop: str = "auto",
        *, quiet: bool = True) -> Any:
    """Run `main` on an event loop; a MqWorkerError ends the command with its message."""
    use_uvloop = loop != "asyncio" and importlib.util.find_spec("uvloop") is not None
    if loop == "uvloop" and not use_uvloop:
        fail("--loop uvloop needs the 'speed' extra: pip install 'mq-worker[speed]'", 2)

    async def _main() -> Any:
        if quiet:
            asyncio.get_running_loop().set_exception_handler(_quiet_exception_handler)
        return await main()

    try:
        return anyio.run(_main, backend="asyncio", backend_options={"use_uvloop": use_uvloop})
    except* MqWorkerError as group:
        fail(str(first_leaf(group)))


def first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception of a (possibly nested) group: the one to tell the user."""
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


# -- settings from the environment -------------------------------------------------


def known_environment() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in WorkerSettings.model_fields} | RUN_ENVIRONMENT


def warn_unknown_environment(environ: dict[str, str] | None = None) -> list[str]:
    """Warn about `MQ_WORKER_*` variables no setting reads (a typo such as MQ_WORKER_LIMT)."""
    environ = dict(os.environ if environ is None else environ)
    known = known_environment()
    unknown = sorted(k for k in environ
                     if k.startswith(ENV_PREFIX) and k not in known
                     and not k.startswith(_RESERVED_PREFIXES))
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warn(f"ignoring unknown environment variable {name}{hint}")
    return unknown


def client_settings(urls: Iterable[str] = (), **overrides: Any) -> ClientSettings:
    """The settings of a client command: its options over MQ_WORKER_* over defaults.
    Worker-only variables (MQ_WORKER_LIMIT, ...) are not read."""
    warn_unknown_environment()
    values = {k: v for k, v in overrides.items() if v is not None}
    urls = list(urls)
    if urls:
        values["url"] = urls
    try:
        return ClientSettings(**values)
    except ValidationError as exc:
        fail(validation_message(exc), 2)


# -- colours -----------------------------------------------------------------------


def color_wanted(flag: bool | None, stream: Any) -> bool:
    """--color/--no-color if given; else no colour under NO_COLOR (https://no-color.org)
    or when `stream` is not a terminal."""
    if flag is not None:
        return flag
    if os.environ.get("NO_COLOR"):
        return False
    return bool(stream.isatty())


def color_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--color/--no-color", "color", default=None,
        help="Colour the output. [default: when a terminal and NO_COLOR is not set]",
    )(function)


# -- durations ----------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION = re.compile(rf"^(?:{_NUMBER}d)?(?:{_NUMBER}h)?(?:{_NUMBER}m)?(?:{_NUMBER}s)?$")
_BARE = re.compile(rf"^{_NUMBER}$")
_UNITS = (86400, 3600, 60, 1)
DURATION_EXAMPLES = "e.g. 90, 90s, 5m, 1h30m, 2d"


def duration_seconds(text: str) -> float:
    """'90' (seconds), '90s', '5m', '1h30m', '2d': each unit at most once, largest first.
    Raises ValueError otherwise ('', '30s30s', '5m1h')."""
    cleaned = text.strip().lower()
    bare = _BARE.fullmatch(cleaned)
    if bare:
        return float(bare.group(1))
    match = _DURATION.fullmatch(cleaned) if cleaned else None
    if match is None or not any(match.groups()):
        raise ValueError(f"not a duration: {text!r} ({DURATION_EXAMPLES})")
    return sum(float(n) * unit for n, unit in zip(match.groups(), _UNITS, strict=True) if n)


def parse_duration(text: str) -> timedelta:
    """A duration as a timedelta; click.BadParameter if it is not one."""
    try:
        return timedelta(seconds=duration_seconds(text))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic since click 8.2
    """A duration option: a number of seconds or 90s, 5m, 1h30m, 2d; converted to seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return duration_seconds(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()
