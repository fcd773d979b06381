"""Publishing runs and cancels, for orchestrators: confirmed, mandatory, optionally signed."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from uuid import UUID, uuid4

import aiormq.abc
import aiormq.exceptions
from pamqp import commands as spec

from mq_worker import topology
from mq_worker.broker import DEFAULT_URL, Link, TlsOptions, split_urls
from mq_worker.delay import ladder_routing_key, park_seconds
from mq_worker.errors import BrokerError, PublishError, UnroutableError
from mq_worker.messages import CancelMessage, RunMessage
from mq_worker.signing import MessageKind, Signer

# A worker holds runs due within this many seconds (its default window is larger):
# parked runs come back that early, to be held and started on time.
_WORKER_PREFETCH_SECONDS = 2.0
# Runs due further ahead than this are parked in the broker by the publisher itself.
DEFAULT_PARK_AFTER_SECONDS = 60.0
# A confirm that has not come after this long is treated like a broken connection:
# on a cluster, a publish caught by a node failure may never be confirmed.
DEFAULT_CONFIRM_TIMEOUT = 15.0


def new_run(
    command: str | Sequence[str] | None = None,
    *,
    name: str | None = None,
    job_variables: dict[str, Any] | None = None,
    scheduled_start_time: datetime | None = None,
    **fields: Any,
) -> RunMessage:
    """A run message with a fresh id; `command` is a shorthand for the job variable: a
    command line, or an argv list (quoted into one, so each item stays one argument)."""
    variables = dict(job_variables or {})
    if command is not None:
        variables["command"] = command_line(command)
    return RunMessage(
        id=fields.pop("id", None) or uuid4(),
        name=name,
        job_variables=variables,
        scheduled_start_time=scheduled_start_time,
        **fields,
    )


def command_line(command: str | Sequence[str]) -> str:
    """The wire form of a command: a string as given, an argv list quoted (shlex.join)."""
    if isinstance(command, str):
        return command
    if not isinstance(command, Sequence) or not all(isinstance(a, str) for a in command):
        raise TypeError(f"command must be a string or a list of strings, not {command!r}")
    if not command:
        raise ValueError("command must not be an empty list")
    return shlex.join(command)


class _NotDeclared(BrokerError):
    """The exchange to publish to does not exist."""


class Publisher:
    """Publishes runs and cancels to `mq_worker.runs`.

    Every publish is confirmed by the broker and mandatory: a run that no queue
    would receive raises UnroutableError instead of vanishing. By default the
    publisher declares the work queue it publishes to, so runs wait for workers
    that have not started yet. A publish whose connection breaks, or whose
    confirmation has not come after `confirm_timeout` seconds, is published once
    more on a new connection (the next address first); then BrokerError.

        async with Publisher("amqp://guest:guest@localhost/") as publisher:
            run = await publisher.submit(new_run("echo hello"), pool="default")
            await publisher.cancel(run.id, pool="default", reason="not needed")
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        name: str = "mq_worker publisher",
        tls: TlsOptions | None = None,
        signing_key_file: Path | None = None,
        declare: bool = True,
        queue_options: topology.QueueOptions | None = None,
        park_after_seconds: float | None = DEFAULT_PARK_AFTER_SECONDS,
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
        legacy_signature: bool = False,
    ) -> None:
        self._link = Link(split_urls(url), name=name, tls=tls)
        self._signer = Signer.from_file(signing_key_file) if signing_key_file else None
        # Also sign with the v1 scheme, for workers of an older version (see security.md).
        self._legacy_signature = legacy_signature
        self._declare = declare
        self._options = queue_options or topology.QueueOptions()
        self._park_after = park_after_seconds
        self._confirm_timeout = confirm_timeout
        self._declared: set[tuple[str, ...]] = set()

    async def __aenter__(self) -> Self:
        await self._link.channel()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._link.close()

    async def submit(
        self, run: RunMessage, *, pool: str = topology.DEFAULT_POOL,
        queue: str = topology.DEFAULT_QUEUE,
    ) -> RunMessage:
        """Publish `run` to (pool, queue); return it once the broker has confirmed it."""
        topology.check_name("pool", pool)
        topology.check_name("queue", queue)
        body = run.model_dump_json(exclude_none=True).encode()
        routing_key = topology.scheduled_routing_key(pool, queue)
        exchange = topology.RUNS_EXCHANGE
        due = run.scheduled_start_time
        parked = (
            due is not None
            and self._park_after is not None
            and due.timestamp() - time.time() > self._park_after
        )

        async def declare(channel: aiormq.abc.AbstractChannel) -> None:
            if self._declare and ("pool", pool, queue) not in self._declared:
                await topology.declare_exchanges(channel)
                await topology.declare_dead_queue(channel)
                await topology.declare_work_queue(channel, pool, queue, self._options)
                self._declared.add(("pool", pool, queue))
            if parked and self._declare and ("ladder",) not in self._declared:
                await topology.declare_delay_ladder(channel)
                self._declared.add(("ladder",))

        if parked:
            assert due is not None
            start = due.timestamp()

            def ladder_key() -> str:  # after declaring, which may take a while
                seconds = park_seconds(start - time.time(), _WORKER_PREFETCH_SECONDS)
                return ladder_routing_key(seconds, routing_key)

            try:
                await self._publish(topology.delay_name(topology.DELAY_LEVELS - 1),
                                    ladder_key, body, str(run.id), declare,
                                    self._signature("run", pool, body))
                return run
            except _NotDeclared:
                # No worker has parked a run yet, so the ladder does not exist and this
                # publisher may not declare it: hand the run to the pool, whose worker parks it.
                pass
            except UnroutableError:
                # The ladder's queues were deleted: the pool's worker that takes the run
                # declares them again and parks it (as would this publisher, next time).
                self._declared.discard(("ladder",))
        await self._publish(exchange, routing_key, body, str(run.id), declare,
                            self._signature("run", pool, body))
        return run

    async def cancel(
        self, run_id: UUID | str, *, pool: str = topology.DEFAULT_POOL, reason: str | None = None
    ) -> None:
        """Publish a cancel for `run_id` to every worker of `pool`."""
        topology.check_name("pool", pool)
        message = CancelMessage(id=UUID(str(run_id)), reason=reason)
        body = message.model_dump_json(exclude_none=True).encode()

        async def declare(channel: aiormq.abc.AbstractChannel) -> None:
            if self._declare and ("cancels",) not in self._declared:
                await topology.declare_exchanges(channel)
                await topology.declare_cancel_stream(channel, self._options)
                self._declared.add(("cancels",))

        await self._publish(
            topology.RUNS_EXCHANGE, topology.cancel_routing_key(pool), body, None, declare,
            self._signature("cancel", pool, body),
        )

    def _signature(self, kind: MessageKind, pool: str, body: bytes) -> dict[str, Any] | None:
        if self._signer is None:
            return None
        return dict(self._signer.headers(body, kind=kind, pool=pool,
                                         legacy=self._legacy_signature))

    async def _publish(
        self,
        exchange: str,
        routing_key: str | Callable[[], str],
        body: bytes,
        message_id: str | None,
        declare: Any,
        headers: dict[str, Any] | None,
    ) -> None:
        properties = spec.Basic.Properties(
            content_type=topology.JSON_CONTENT_TYPE,
            delivery_mode=2,
            message_id=message_id or uuid4().hex,
            timestamp=datetime.now(UTC),
            headers=headers,
        )
        # One retry on another connection (and node) if the first one breaks.
        for attempt in (1, 2):
            try:
                channel = await self._link.channel()
                await declare(channel)
                key = routing_key if isinstance(routing_key, str) else routing_key()
                await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=key,
                    properties=properties,
                    mandatory=True,
                    timeout=self._confirm_timeout,
                )
                return
            except aiormq.exceptions.PublishError:
                raise UnroutableError(
                    f"no queue is bound to {key!r} on {exchange!r}"
                ) from None
            except aiormq.exceptions.DeliveryError as exc:
                raise PublishError(f"the broker refused the message: {exc}") from None
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                await self._link.reset()
                raise _NotDeclared(
                    f"{exc}: declare it by starting a worker, or publish with declare=True"
                ) from None
            except aiormq.exceptions.ChannelAccessRefused as exc:
                await self._link.reset()
                raise BrokerError(f"the broker refused access: {exc}") from None
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
                self._declared.clear()
                await self._link.reset()
                if attempt == 2:
                    raise BrokerError(f"cannot publish: {type(exc).__name__}: {exc}") from exc
