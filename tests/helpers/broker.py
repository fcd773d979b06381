"""The local broker as tests administer it (mq_worker.testing, addressed by the
MQ_WORKER_TEST_HOST, _PORT and _MANAGEMENT variables), and publishing as an outside client."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import aio_pika
import anyio

from mq_worker.testing import LocalBroker, VHost, rabbitmqctl
from tests.helpers.waiting import wait_until

BROKER = LocalBroker.from_environment("MQ_WORKER_TEST")
HOST = BROKER.host
PORT = BROKER.port
MANAGEMENT = BROKER.management_url
management = BROKER.management

__all__ = ["BROKER", "HOST", "MANAGEMENT", "PORT", "VHost", "consumer_count", "management",
           "publish_raw", "queue_deleted", "queue_exists", "queue_stats", "rabbitmqctl",
           "ready_counts", "until_consumers", "until_no_run_left", "until_ready"]


async def publish_raw(
    url: str,
    body: bytes | dict[str, Any],
    *,
    routing_key: str = "run.scheduled.default.default",
    headers: dict[str, Any] | None = None,
    exchange: str = "mq_worker.runs",
) -> None:
    """Publish like an outside client would: plain aio-pika, no mq_worker code."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
        await target.publish(
            aio_pika.Message(body, content_type="application/json",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers),
            routing_key=routing_key,
        )


async def ready_counts(url: str, queues: list[str], *, missing_ok: bool = False) -> dict[str, int]:
    """{queue: messages ready} as the queues have them now, by passive declares: without the
    second or so `rabbitmqctl` takes to start, nor the statistics' lag of a quorum queue.
    Messages delivered and not yet acknowledged are not counted: ask once their consumers
    are gone (the broker then gives them back). With `missing_ok`, a queue that does not
    exist (one declared only when first used) counts as holding none."""
    connection = await aio_pika.connect(url)
    async with connection:
        counts: dict[str, int] = {}
        for queue in queues:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                if not missing_ok:
                    raise
                counts[queue] = 0
                continue
            counts[queue] = int(declared.declaration_result.message_count or 0)
            await channel.close()
        return counts


async def until_ready(url: str, wanted: dict[str, int], *, at_least: bool = False,
                      timeout: float = 15) -> None:
    """Until each queue of `wanted` has that many messages ready (or more, `at_least`), by
    passive declares (a queue not declared yet holds none)."""
    async def reached() -> bool:
        counts = await ready_counts(url, list(wanted), missing_ok=True)
        return all(counts[queue] >= n if at_least else counts[queue] == n
                   for queue, n in wanted.items())

    await wait_until(reached, timeout=timeout)


async def consumer_count(url: str, queue: str) -> int:
    """The consumers of `queue` as the broker has them now, by a passive declare (at once,
    where `rabbitmqctl list_consumers` takes a second or so to start)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)


async def queue_exists(url: str, queue: str) -> bool:
    """Whether `queue` exists now (a passive declare)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True


async def queue_deleted(url: str, queue: str) -> bool:
    return not await queue_exists(url, queue)


def queue_stats(vhost: VHost, *columns: str) -> dict[str, dict[str, Any]]:
    """{queue: {column: value}} of every queue of `vhost`, by the management API, which
    lists the queues that exist now but refreshes their statistics (message counts) only
    every 5 s or so: a count from here is current only once it has been seen to change.
    For what a passive declare cannot tell (unacknowledged messages, many queues at once)."""
    quoted = urllib.parse.quote(vhost.name, safe="")
    rows = management("GET", f"/queues/{quoted}?columns={','.join(['name', *columns])}")
    return {row["name"]: row for row in rows}


async def until_consumers(url: str, queue: str, count: int, *, timeout: float = 15) -> None:
    """Until `queue` has `count` consumers (passive declares)."""
    async def reached() -> bool:
        return await consumer_count(url, queue) == count

    await wait_until(reached, timeout=timeout)


async def until_no_run_left(url: str, queues: list[str], worker: Any,
                            timeout: float = 30) -> None:
    """Until no message is ready in `queues` (passive declares; a queue not declared yet
    holds none) and `worker` holds no run and no unsettled delivery, for 0.3 s in a row:
    a message on its way from one queue to the next, or to the worker, is not missed."""
    with anyio.fail_after(timeout):
        quiet_since = None
        while True:
            ready = sum((await ready_counts(url, queues, missing_ok=True)).values())
            consumer = worker._consumer
            if ready or worker.in_flight or consumer is None or consumer.unsettled():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = anyio.current_time()
            elif anyio.current_time() - quiet_since >= 0.3:
                return
            await anyio.sleep(0.05)
