"""Declarations of the exchanges and queues, with their broker-side arguments.

Declarations are idempotent and never destructive: declaring what exists with the
same arguments is a no-op, declaring it with other arguments is a `TopologyMismatch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiormq
import aiormq.exceptions

from mq_worker.errors import TopologyMismatch
from mq_worker.topology.names import (
    CANCELS_BINDING,
    CANCELS_STREAM,
    CONTROL_BINDING,
    CONTROL_STREAM,
    DEAD_QUEUE,
    DEFAULT_DELIVERY_LIMIT,
    DELAY_LEVELS,
    DUE_EXCHANGE,
    EVENTS_EXCHANGE,
    LEGACY_HEARTBEAT_BINDING,
    OUTPUT_EXCHANGE,
    PING_EXCHANGE,
    RUNS_EXCHANGE,
    cancel_snapshot_stream_name,
    delay_name,
    due_binding_key,
    heartbeat_stream_name,
    limit_queue_name,
    monitor_queue_name,
    pool_routing_key,
    scheduled_routing_key,
    waiting_queue_name,
    work_queue_name,
)


@dataclass(frozen=True)
class QueueOptions:
    """Broker-side arguments of the durable structures a worker declares."""

    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    cancel_max_age: str = "30D"
    cancel_max_bytes: int = 256 * 1024 * 1024


def quorum_arguments(*, dead_letter: bool, delivery_limit: int | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"x-queue-type": "quorum"}
    if delivery_limit is not None:
        args["x-delivery-limit"] = delivery_limit
    if dead_letter:
        args.update(
            {
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": DEAD_QUEUE,
                # At-least-once dead-lettering needs reject-publish overflow.
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        )
    return args


def work_queue_arguments(options: QueueOptions) -> dict[str, Any]:
    return quorum_arguments(dead_letter=True, delivery_limit=options.delivery_limit)


def cancel_stream_arguments(options: QueueOptions) -> dict[str, Any]:
    return {
        "x-queue-type": "stream",
        "x-max-age": options.cancel_max_age,
        "x-max-length-bytes": options.cancel_max_bytes,
        "x-stream-max-segment-size-bytes": min(options.cancel_max_bytes // 8, 16 * 1024 * 1024),
    }


def delay_queue_arguments(level: int) -> dict[str, Any]:
    next_exchange = delay_name(level - 1) if level else DUE_EXCHANGE
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": 1000 * 2**level,
        "x-dead-letter-exchange": next_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def monitor_queue_arguments() -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        # Only fresh heartbeats matter to the elected monitor.
        "x-message-ttl": 5 * 60 * 1000,
        "x-max-length": 10_000,
    }


def ping_queue_arguments() -> dict[str, Any]:
    # Pings waiting for a slow worker are all the same: the broker keeps a few.
    return {"x-max-length": 16}


def heartbeat_stream_arguments() -> dict[str, Any]:
    # A new reporter replays minutes, not hours; small segments let retention work.
    return {
        "x-queue-type": "stream",
        "x-max-age": "1h",
        "x-max-length-bytes": 256 * 1024 * 1024,
        "x-stream-max-segment-size-bytes": 8 * 1024 * 1024,
    }


def cancel_snapshot_stream_arguments() -> dict[str, Any]:
    # Only the newest snapshot is read; retention keeps the last segment whatever its age.
    return {
        "x-queue-type": "stream",
        "x-max-length-bytes": 64 * 1024 * 1024,
        "x-stream-max-segment-size-bytes": 16 * 1024 * 1024,
    }


async def declare_queue(
    channel: aiormq.abc.AbstractChannel, name: str, arguments: Mapping[str, Any]
) -> int:
    """Declare the queue; return the number of messages the broker says it holds."""
    try:
        ok = await channel.queue_declare(name, durable=True, arguments=dict(arguments))
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyMismatch(
            f"queue {name!r} exists with other arguments than {dict(arguments)!r} ({exc}); "
            "delete it or align its arguments (see docs/operations.md)"
        ) from exc
    return ok.message_count or 0


async def declare_exchanges(channel: aiormq.abc.AbstractChannel) -> None:
    """Declare the runs, events and due exchanges."""
    for name in (RUNS_EXCHANGE, EVENTS_EXCHANGE, DUE_EXCHANGE):
        await channel.exchange_declare(name, exchange_type="topic", durable=True)


async def declare_output_exchange(channel: aiormq.abc.AbstractChannel) -> None:
    """Declared by those who publish or follow run output, not by every publisher."""
    await channel.exchange_declare(OUTPUT_EXCHANGE, exchange_type="topic", durable=True)


async def declare_dead_queue(channel: aiormq.abc.AbstractChannel) -> None:
    await declare_queue(channel, DEAD_QUEUE, quorum_arguments(dead_letter=False))


async def declare_work_queue(
    channel: aiormq.abc.AbstractChannel, pool: str, queue: str, options: QueueOptions
) -> str:
    """Declare the work queue of (pool, queue) with its bindings; return its name."""
    name = work_queue_name(pool, queue)
    await declare_queue(channel, name, work_queue_arguments(options))
    await channel.queue_bind(name, RUNS_EXCHANGE, routing_key=scheduled_routing_key(pool, queue))
    await channel.queue_bind(name, DUE_EXCHANGE, routing_key=due_binding_key(pool, queue))
    return name


async def declare_cancel_stream(
    channel: aiormq.abc.AbstractChannel, options: QueueOptions
) -> None:
    await declare_queue(channel, CANCELS_STREAM, cancel_stream_arguments(options))
    await channel.queue_bind(CANCELS_STREAM, RUNS_EXCHANGE, routing_key=CANCELS_BINDING)


async def declare_cancel_snapshot_stream(channel: aiormq.abc.AbstractChannel, pool: str
                                         ) -> int:
    """Declare the pool's snapshot stream; return how many messages it holds."""
    return await declare_queue(channel, cancel_snapshot_stream_name(pool),
                        cancel_snapshot_stream_arguments())


async def declare_monitor(channel: aiormq.abc.AbstractChannel, pool: str) -> None:
    """Declare what a pool's workers use to watch each other: the ping exchange,
    the pool's heartbeat stream and its election queue."""
    await channel.exchange_declare(PING_EXCHANGE, exchange_type="topic", durable=True)
    stream = heartbeat_stream_name(pool)
    await declare_queue(channel, stream, heartbeat_stream_arguments())
    await channel.queue_bind(stream, EVENTS_EXCHANGE, routing_key=pool_routing_key(pool))
    election = monitor_queue_name(pool)
    await declare_queue(channel, election, monitor_queue_arguments())
    # Earlier versions fed every heartbeat of every pool to this queue.
    await channel.queue_unbind(election, EVENTS_EXCHANGE, routing_key=LEGACY_HEARTBEAT_BINDING)


async def declare_delay_ladder(channel: aiormq.abc.AbstractChannel) -> None:
    """Declare the delay levels and the exchange that parked runs reach when due.

    A parked message's routing key starts with DELAY_LEVELS words, the bits of
    its delay in seconds, highest first. At level N the exchange sends a message
    whose bit N is 1 into queue N (which holds it 2**N seconds, then
    dead-letters it to level N-1) and one whose bit is 0 straight on to level N-1.
    """
    await channel.exchange_declare(DUE_EXCHANGE, exchange_type="topic", durable=True)
    for level in range(DELAY_LEVELS):
        await channel.exchange_declare(delay_name(level), exchange_type="topic", durable=True)
    for level in range(DELAY_LEVELS):
        name = delay_name(level)
        skip = "*." * (DELAY_LEVELS - 1 - level)
        await declare_queue(channel, name, delay_queue_arguments(level))
        await channel.queue_bind(name, name, routing_key=f"{skip}1.#")
        next_exchange = delay_name(level - 1) if level else DUE_EXCHANGE
        await channel.exchange_bind(
            destination=next_exchange, source=name, routing_key=f"{skip}0.#"
        )


async def declare_pool(
    channel: aiormq.abc.AbstractChannel,
    pool: str,
    queues: list[str],
    options: QueueOptions,
) -> list[str]:
    """Declare what a worker of `pool` serving `queues` needs; return the work queue names.

    The delay ladder is declared when a run is first parked (`declare_delay_ladder`):
    its 25 queues are not needed by deployments that never schedule ahead.
    """
    await declare_exchanges(channel)
    await declare_dead_queue(channel)
    await declare_cancel_stream(channel, options)
    return [await declare_work_queue(channel, pool, q, options) for q in queues]



# -- work pools: pauses and shared limits -------------------------------------------


def control_stream_arguments() -> dict[str, Any]:
    # No age limit: a pause or limit set a year ago still holds.
    return {"x-queue-type": "stream", "x-max-length-bytes": 64 * 1024 * 1024}


async def declare_control_stream(channel: aiormq.abc.AbstractChannel) -> None:
    await channel.exchange_declare(RUNS_EXCHANGE, exchange_type="topic", durable=True)
    await declare_queue(channel, CONTROL_STREAM, control_stream_arguments())
    await channel.queue_bind(CONTROL_STREAM, RUNS_EXCHANGE, routing_key=CONTROL_BINDING)


async def declare_limit_queues(channel: aiormq.abc.AbstractChannel, target: str) -> None:
    await declare_queue(channel, limit_queue_name(target), quorum_arguments(dead_letter=False))
    await declare_queue(channel, waiting_queue_name(target), quorum_arguments(dead_letter=False))
