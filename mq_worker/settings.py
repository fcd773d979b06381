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
from mq_worker.topology import DEFAULT_DELIVERY_LIMIT, QueueOptions, check_name

_WORKER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class WorkerSettings(BaseSettings):
    """Everything a worker can be told. Each field `x` is also `MQ_WORKER_X`."""

    model_config = SettingsConfigDict(env_prefix="MQ_WORKER_", extra="forbid")

    url: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_URL],
        description="Broker addresses, tried in order; several for a cluster.",
    )
    pool: str = "default"
    queue: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["default"])
    limit: int = Field(default=4, ge=1, le=10_000, description="Most runs in flight at once.")
    name: str = Field(default_factory=default_worker_name)
    type: str = "process"
    prefetch_seconds: float = Field(
        default=10.0, ge=0, le=600,
        description="Runs due within this many seconds are taken and held; later ones parked.",
    )
    heartbeat_seconds: float = Field(default=30.0, gt=0, le=3600)
    drain_timeout: float | None = Field(
        default=None, ge=0,
        description="On stop, cancel runs still running after this many seconds (default: wait).",
    )
    grace_seconds: float = Field(
        default=30.0, ge=0, le=3600, description="Default SIGTERM-to-SIGKILL grace on cancel."
    )
    job_template: Path | None = Field(default=None, description="A base job template JSON file.")
    signing_key_file: Path | None = None
    allow_command_prefix: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024)
    outbox_size: int = Field(default=DEFAULT_CAPACITY, ge=10)
    output_max_bytes: int = Field(
        default=10 * 1024 * 1024, ge=0,
        description="Output bytes of a run shipped to mq_worker.output; then one marker.",
    )
    spool_dir: Path | None = None
    cancel_window_seconds: float = Field(default=30 * 24 * 3600, gt=0)
    delivery_limit: int = Field(default=DEFAULT_DELIVERY_LIMIT, ge=1)
    ack_grace: float = Field(default=1.0, ge=0, le=60)
    window: int | None = Field(default=None, ge=1, description="Largest prefetch per queue.")
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    health_port: int | None = Field(default=None, ge=0, le=65535)
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"

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
            return ["default"]
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
    def _window(self) -> WorkerSettings:
        if self.window is None:
            self.window = max(1, self.limit // 4)
        return self

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
