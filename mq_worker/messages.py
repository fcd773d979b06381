"""Run and cancel messages: the wire models and their parsing.

Workers accept any message that validates against these models and ignore
unknown fields, so publishers can move ahead of workers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, TypeVar
from uuid import UUID

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
)

from mq_worker.errors import InvalidMessage

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
SCHEMA_VERSION = 1

Text = Annotated[str, StringConstraints(max_length=1024)]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def _as_utc(value: datetime) -> datetime:
    """A time without offset is UTC."""
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00 is past year 9999 in UTC
        raise ValueError("time is out of range in UTC") from None


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]

_NUMBER_TEXT = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _start_time(value: Any) -> Any:
    """A start time is an RFC 3339 string or a JSON number of Unix seconds, nothing else.

    (Left to pydantic, a number above 2e10 would be read as milliseconds, and a
    number in a string as either: 253402300799, the last second of year 9999,
    would start in 1978.)
    """
    if isinstance(value, bool):
        raise ValueError("must be an RFC 3339 string or a number of Unix seconds")
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError("Unix seconds out of range (years 1 to 9999)") from None
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value):
        raise ValueError(
            "a number in a string is ambiguous: send RFC 3339 or a JSON number of Unix seconds")
    return value


StartTime = Annotated[
    UtcDatetime,
    BeforeValidator(_start_time),
    WithJsonSchema({
        "anyOf": [
            {"type": "string", "format": "date-time"},
            {"type": "number", "description": "Unix seconds"},
        ]
    }),
]


class _WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FlowRef(_WireModel):
    """The flow a run belongs to."""

    id: Identifier | None = None
    name: Text | None = None


class DeploymentRef(_WireModel):
    """The deployment a run was created from, with its job variables."""

    id: Identifier | None = None
    name: Text | None = None
    job_variables: dict[str, Any] = Field(default_factory=dict)


TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


class RunMessage(_WireModel):
    """A scheduled run, as published to `mq_worker.runs` with key `run.scheduled.<pool>.<queue>`."""

    id: UUID = Field(description="Run id; a worker never runs the same id twice at once.")
    name: Text | None = None
    flow: FlowRef | None = None
    deployment: DeploymentRef | None = None
    job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="Job variables; a key here replaces the deployment's.",
    )
    parameters: dict[str, Any] = Field(default_factory=dict)
    tags: list[Text] = Field(default_factory=list, max_length=256)
    scheduled_start_time: StartTime | None = Field(
        default=None,
        description="RFC 3339 (a time without offset is UTC) or a number of Unix seconds. "
        "Absent means now.",
    )
    concurrency_key: Identifier | None = Field(
        default=None,
        description="A key whose limit (`mq-worker limit set key:<key> N`) the run counts against.",
    )
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    attempt: int = Field(
        default=1, ge=1, le=100_000,
        description="Which attempt of the run this is, from 1; set by the worker that "
                    "schedules a retry.",
    )
    traceparent: str | None = Field(
        default=None, pattern=TRACEPARENT_PATTERN,
        description="W3C Trace Context `traceparent` of the publisher's span: copied to the "
                    "run's events (CloudEvents distributed tracing extension) and to its "
                    "process's TRACEPARENT environment variable.",
    )

    def merged_job_variables(self) -> dict[str, Any]:
        """The deployment's job variables shallow-merged with the run's (the run's win)."""
        base = self.deployment.job_variables if self.deployment else {}
        return {**base, **self.job_variables}

    @cached_property
    def id_text(self) -> str:
        """`str(id)`, made once: a run's start and end use it a dozen times. Not a field:
        it is in neither the run's JSON nor its equality."""
        return str(self.id)

    @property
    def display_name(self) -> str:
        return self.name or self.id_text


class CancelMessage(_WireModel):
    """A cancel, as published to `mq_worker.runs` with key `run.cancel.<pool>`."""

    id: UUID
    reason: Text | None = None


def _describe(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{location}: {first['msg']}{more}"


def _readable_id(body: bytes) -> UUID | None:
    """The run id of a body that failed validation, when one can still be read."""
    try:
        value = orjson.loads(body)
        return UUID(str(value["id"])) if isinstance(value, dict) else None
    except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
        return None


M = TypeVar("M", bound=_WireModel)


def _parse(
    model: type[M], body: bytes, max_bytes: int, verify: Callable[[bytes], None] | None
) -> M:
    if len(body) > max_bytes:
        raise InvalidMessage(f"message of {len(body)} bytes exceeds the cap of {max_bytes} bytes")
    if verify is not None:  # after the size cap: never hash an oversized body
        verify(body)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise InvalidMessage(f"body is not valid JSON: {_describe(exc)}") from None
        raise InvalidMessage(_describe(exc), run_id=_readable_id(body)) from None


def parse_run(
    body: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    verify: Callable[[bytes], None] | None = None,
) -> RunMessage:
    """Validate a run message body; raise InvalidMessage with a one-line reason.

    `verify` (a signature check that raises InvalidMessage) runs once the size is known good.
    """
    return _parse(RunMessage, body, max_bytes, verify)


def parse_cancel(
    body: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    verify: Callable[[bytes], None] | None = None,
) -> CancelMessage:
    """Validate a cancel message body; raise InvalidMessage with a one-line reason."""
    return _parse(CancelMessage, body, max_bytes, verify)
