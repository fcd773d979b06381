"""Worker settings: command-line options over `MQ_WORKER_*` environment variables over defaults."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mq_worker.broker import DEFAULT_URL, TlsOptions, mask_url, split_urls
from mq_worker.messages import DEFAULT_MAX_MESSAGE_BYTES
from mq_worker.outbox import DEFAULT_CAPACITY
from mq_worker.peer_events import DEFAULT_MAX_PEERS, MAX_HEARTBEAT_SECONDS
from mq_worker.signing import DEFAULT_MAX_AGE_SECONDS
from mq_worker.topology import (
    DEFAULT_DELIVERY_LIMIT,
    DEFAULT_POOL,
    DEFAULT_QUEUE,
    QueueOptions,
    check_name,
)

_WORKER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


ENV_PREFIX = "MQ_WORKER_"
# Variables the worker gives its runs (besides MQ_WORKER_POOL and MQ_WORKER_QUEUE): known
# names, so a run that calls `mq-worker` is not warned about them.
RUN_ENVIRONMENT = frozenset({"MQ_WORKER_RUN_ID", "MQ_WORKER_RUN_NAME", "MQ_WORKER_WORKER"})


class WorkerSettings(BaseSettings):
    """Everything a worker can be told. Each field `x` is also `MQ_WORKER_X`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    url: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_URL],
        description="Broker addresses, tried in order; several for a cluster (comma-separated).",
    )
    pool: str = Field(default=DEFAULT_POOL, description="Work pool to serve.")
    queue: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_QUEUE],
        description="Work queues of the pool to consume (comma-separated).",
    )
    limit: int = Field(default=4, ge=1, le=10_000, description="Most runs in flight at once.")
    processes: int = Field(
        default=1, ge=1, le=256,
        description="Worker processes under one supervisor, each with a share of the limit "
        "and the name <name>-<i>.",
    )
    name: str = Field(
        default_factory=default_worker_name, description="Worker name, unique per broker.",
        json_schema_extra={"shown_default": "<hostname>-<pid>"},
    )
    type: str = Field(
        default="process",
        description="Worker type: an entry point of the mq_worker.workers group.",
    )
    prefetch_seconds: float = Field(
        default=10.0, ge=0, le=600,
        description="Runs due within this many seconds are taken and held; later ones parked.",
    )
    heartbeat_seconds: float = Field(
        default=30.0, gt=0, le=MAX_HEARTBEAT_SECONDS,
        description="Seconds between heartbeat events.",
    )
    reporter_max_peers: int = Field(
        default=DEFAULT_MAX_PEERS, ge=1,
        description="Most workers of the pool the elected reporter follows at once; "
                    "worker events of further names are refused and counted.",
    )
    drain_timeout: float | None = Field(
        default=None, ge=0,
        description="On stop, cancel runs still running after this many seconds.",
        json_schema_extra={"shown_default": "wait for every run"},
    )
    grace_seconds: float = Field(
        default=30.0, ge=0, le=3600, description="Default SIGTERM-to-SIGKILL grace on cancel."
    )
    job_template: Path | None = Field(
        default=None, description="A base job template JSON file.",
        json_schema_extra={"shown_default": "the worker type's own template"},
    )
    signing_key_file: Path | None = Field(
        default=None, description="Accept only messages signed with a key from this file.",
        json_schema_extra={"shown_default": "unsigned messages accepted"},
    )
    signature_max_age_seconds: float = Field(
        default=DEFAULT_MAX_AGE_SECONDS, gt=0,
        description="Refuse signed runs issued longer ago than this (or due longer ago).",
    )
    allow_command_prefix: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Run only commands under these directories (comma-separated).",
        json_schema_extra={"shown_default": "any command"},
    )
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024, description="Larger messages are rejected."
    )
    outbox_size: int = Field(
        default=DEFAULT_CAPACITY, ge=10, description="Events waiting before intake stops."
    )
    output_max_bytes: int = Field(
        default=10 * 1024 * 1024, ge=0,
        description="Output bytes of a run shipped to mq_worker.output; then one marker.",
    )
    spool_dir: Path | None = Field(
        default=None, description="Keep unpublished events in a file here, across restarts.",
        json_schema_extra={"shown_default": "memory only"},
    )
    cancel_window_seconds: float = Field(
        default=30 * 24 * 3600, gt=0,
        description="Seconds a cancel is remembered for a run not yet seen.",
    )
    delivery_limit: int = Field(
        default=DEFAULT_DELIVERY_LIMIT, ge=1,
        description="Deliveries of a message before it is dead-lettered.",
    )
    ack_grace: float = Field(
        default=1.0, ge=0, le=60,
        description="Near full capacity, seconds a started run's acknowledgement may wait for a "
        "free slot before the consumer is re-sized (0.25 at most while a --window of the "
        "limit is wide: limit 3 or more).",
    )
    window: int | None = Field(
        default=None, ge=1, description="Largest prefetch per queue.",
        json_schema_extra={"shown_default": "limit / 2, at least 2 (at most the limit)"},
    )
    run_events: Literal["all", "outcomes"] = Field(
        default="all",
        description="Run events published: all, or outcomes only (no run.pending or "
        "run.submitted; a third of the broker's work per run).",
    )
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle that signs the broker's certificate (amqps://).",
        json_schema_extra={"shown_default": "the system's CAs"},
    )
    tls_cert_file: Path | None = Field(
        default=None, description="Client certificate for TLS authentication.",
        json_schema_extra={"shown_default": "none"},
    )
    tls_key_file: Path | None = Field(
        default=None, description="Private key of the client certificate.",
        json_schema_extra={"shown_default": "none"},
    )
    health_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Serve /livez, /readyz and /metrics on this port (0: any free port).",
        json_schema_extra={"shown_default": "not served"},
    )
    health_host: str = Field(
        default="127.0.0.1",
        description="Address the health port binds; 0.0.0.0 for every interface.",
    )
    log_format: Literal["auto", "console", "json"] = Field(
        default="auto", description="Log format; auto: console on a terminal, else JSON lines."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Least severe log level shown."
    )
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        default="auto", description="Event loop; auto: uvloop when installed."
    )

    @field_validator("url", mode="before")
    @classmethod
    def _urls(cls, value: Any) -> list[str]:
        return split_urls(value if value else [DEFAULT_URL])

    @field_validator("queue", "allow_command_prefix", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        return check_name("pool", value)

    @field_validator("queue")
    @classmethod
    def _queues(cls, value: list[str]) -> list[str]:
        if not value:
            return [DEFAULT_QUEUE]
        return list(dict.fromkeys(check_name("queue", q) for q in value))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _WORKER_NAME.fullmatch(value):
            raise ValueError(
                "a worker name has 1-128 letters, digits or '.', '_', '@', ':', '-'"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _limit_per_process(self) -> WorkerSettings:
        if self.limit < self.processes:
            raise ValueError(f"a limit of {self.limit} cannot give each of {self.processes} "
                             "processes a run slot: raise --limit or lower --processes")
        return self

    @property
    def narrow_window(self) -> int:
        """The window: --window, or half the limit. While fewer runs than that run, a run is
        acknowledged as soon as it starts; beyond, its acknowledgement waits for a free slot
        and goes with others in one frame, which the quorum queue settles for about the cost
        of one. Two at least: with one, no two acknowledgements can go together
        (docs/benchmarks.md). With --window at the limit or above, this is the window while
        runs are not short (mq_worker.window_width)."""
        half = max(min(2, self.limit), self.limit // 2)
        return half if self.window is None or self.window >= self.limit else self.window

    @property
    def wide_window(self) -> int:
        """The window while runs are short: --window, or without it the narrow one (a window
        of the whole limit makes every started run's acknowledgement wait for a run to end,
        so it is asked for, not the default: docs/operations.md)."""
        return self.window or self.narrow_window

    @property
    def tls(self) -> TlsOptions:
        return TlsOptions(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)

    @property
    def queue_options(self) -> QueueOptions:
        return QueueOptions(delivery_limit=self.delivery_limit)

    @property
    def spool_path(self) -> Path | None:
        return self.spool_dir / f"{self.name}.outbox.jsonl" if self.spool_dir else None

    def masked_urls(self) -> list[str]:
        return [mask_url(u) for u in self.url]


class ClientSettings(BaseSettings):
    """What `submit`, `cancel`, `events` and `status` read from `MQ_WORKER_*`: where the
    broker is and which pool and queue, but none of a worker's own settings."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    url: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [DEFAULT_URL])
    pool: str = DEFAULT_POOL
    # A worker's MQ_WORKER_QUEUE may list several queues; a client publishes to the first.
    queue: Annotated[str, NoDecode] = DEFAULT_QUEUE
    signing_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @field_validator("url", mode="before")
    @classmethod
    def _urls(cls, value: Any) -> list[str]:
        return split_urls(value if value else [DEFAULT_URL])

    @field_validator("queue", mode="before")
    @classmethod
    def _first_queue(cls, value: Any) -> Any:
        items = _split(value)
        return items[0] if isinstance(items, list) and items else value or DEFAULT_QUEUE

    @field_validator("pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        return check_name("pool", value)

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str) -> str:
        return check_name("queue", value)

    @property
    def tls(self) -> TlsOptions:
        return TlsOptions(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
