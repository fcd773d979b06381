"""Logging through structlog: readable on a terminal, JSON lines otherwise, secrets masked."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import orjson
import structlog

from mq_worker.broker import mask_secrets

LogFormat = Literal["auto", "console", "json"]


def mask_secrets_processor(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace the password of any URL, anywhere in the event (tracebacks included), by '****'."""
    for key, value in event_dict.items():
        # Most values are strings without a URL or numbers: looked at, left in place.
        kind = type(value)
        if kind is str:
            if "://" in value:
                event_dict[key] = mask_secrets(value)
        elif kind is not int and kind is not float and value is not None:
            event_dict[key] = _masked(value)
    return event_dict


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value) if "://" in value else value
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_masked(item) for item in value)
    if isinstance(value, BaseException):
        return _masked(f"{type(value).__name__}: {value}")
    return value


class _UnfailingStream:
    """A stream whose writes never raise: a log line that cannot be written is lost,
    but the worker and its runs go on (a closed pipe, `| head`, a full disk)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()


def _json_dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


class NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that knows the name it was asked for (`structlog.get_logger(name)`)."""

    def __init__(self, file: Any, name: str) -> None:
        super().__init__(file)
        self.name = name

    def msg(self, message: str) -> None:
        # print() writes the record and its newline separately: two write(2) calls on
        # stderr per record, and the worker logs two records per run at INFO.
        with self._lock:
            self._file.write(message + "\n")
            self._file.flush()

    log = debug = info = warn = warning = err = error = critical = exception = failure = \
        fatal = msg


class NamedPrintLoggerFactory:
    def __init__(self, file: Any) -> None:
        self._file = file

    def __call__(self, *args: Any) -> NamedPrintLogger:
        return NamedPrintLogger(self._file, str(args[0]) if args else "mq_worker")


def add_logger_name(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Every record says which part of the worker wrote it (`logger`)."""
    name = getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


def colors_wanted(stream: Any) -> bool:
    """Colour on a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return bool(stream.isatty()) and not os.environ.get("NO_COLOR")


class _DuplicateConnectErrors(logging.Filter):
    """aiormq logs every failed connection attempt as an error; the worker and the client
    commands report the same failure themselves, with the masked address and what they do
    next (retry, or exit), so aiormq's copy goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("error when creating transport")


_CONNECT_ERRORS = _DuplicateConnectErrors()


def configure(log_format: LogFormat = "auto", level: str = "INFO",
              colors: bool | None = None) -> None:
    """Configure structlog and the standard library's logging (used by aio-pika) alike.
    `colors`: colour console lines (default: on a terminal without NO_COLOR)."""
    stream = sys.stderr
    console = log_format == "console" or (log_format == "auto" and stream.isatty())
    safe: Any = _UnfailingStream(stream)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=colors_wanted(stream) if colors is None else colors)
        if console
        else structlog.processors.JSONRenderer(serializer=_json_dumps)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            add_logger_name,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            mask_secrets_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=NamedPrintLoggerFactory(safe),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(safe)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                mask_secrets_processor,
                renderer,
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    connection_logger = logging.getLogger("aiormq.connection")
    if _CONNECT_ERRORS not in connection_logger.filters:
        connection_logger.addFilter(_CONNECT_ERRORS)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelName(level)))
