"""Shared limits: the broker round trips a limited run pays, alone, with a bare aiormq client.

    .venv/bin/python -m benchmarks.limit_rounds [--count 300]

The requests of mq_worker.slots, each timed `count` times, interleaved (wall time and
the client's CPU time per request, under uvloop), in a vhost of its own:

* `basic.get` + `basic.nack` of a token on a quorum queue (taking a slot, giving it
  back: the nack has no reply), and the same on a classic queue: their difference is
  the Raft round;
* `basic.get`, then `basic.ack` + `basic.publish` of the token + `tx.commit` on a
  transactional channel: taking a slot and giving it back as mq_worker does (see
  SlotRequests.settle); and the give-back alone (the commit's round trip);
* a passive declare of a queue (the count of the runs waiting);
* the quorum get and the passive declare at once, on two channels (a fresh run
  without a spare);
* the same, the declare's 0 made sure of with a `basic.get` of the empty waiting
  queue (a fresh run without a spare while nobody waits, see docs/pools.md);
* the quorum get and a get of the empty waiting queue at once, with no declare;
* what a run that gives its token back pays to wake runs while nobody waits: a passive
  declare of the waiting queue (before), that declare's 0 made sure of with a get, and
  a get of the waiting queue alone (what it pays now: see docs/pools.md).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq.abc
import uvloop
from pamqp import commands as spec

from benchmarks._broker import vhost
from benchmarks._report import print_table, summarize_ms
from benchmarks._runner import command_line, run_benchmark

QUORUM = {"x-queue-type": "quorum"}
TOKEN = b'{"target":"key:bench","number":0,"version":1}'


async def get_and_nack(channel: aiormq.abc.AbstractChannel, queue: str) -> None:
    message = await channel.basic_get(queue, no_ack=False)
    assert isinstance(message.delivery, spec.Basic.GetOk)
    await channel.basic_nack(message.delivery.delivery_tag, requeue=True, wait=False)


async def get_and_give_back(channel: aiormq.abc.AbstractChannel, queue: str,
                            give_back_ms: list[float]) -> None:
    message = await channel.basic_get(queue, no_ack=False)
    assert isinstance(message.delivery, spec.Basic.GetOk)
    began = time.perf_counter()
    await channel.basic_ack(message.delivery.delivery_tag)
    await channel.basic_publish(message.body, exchange="", routing_key=queue,
                                properties=spec.Basic.Properties(delivery_mode=2))
    await channel.tx_commit()
    give_back_ms.append(time.perf_counter() - began)


async def get_and_count(get: aiormq.abc.AbstractChannel,
                        declare: aiormq.abc.AbstractChannel) -> None:
    message, _ = await asyncio.gather(get.basic_get("tokens.quorum", no_ack=False),
                                      declare.queue_declare("waiting", passive=True))
    assert isinstance(message.delivery, spec.Basic.GetOk)
    await get.basic_nack(message.delivery.delivery_tag, requeue=True, wait=False)


async def get_and_count_made_sure(get: aiormq.abc.AbstractChannel,
                                  declare: aiormq.abc.AbstractChannel) -> None:
    """As `get_and_count`, the declare's 0 made sure of with a get of the (empty) waiting
    queue, as a fresh run without a spare does while nobody waits."""
    async def count() -> None:
        declared = await declare.queue_declare("waiting", passive=True)
        if not declared.message_count:
            empty = await declare.basic_get("waiting", no_ack=False)
            assert not isinstance(empty.delivery, spec.Basic.GetOk)

    message, _ = await asyncio.gather(get.basic_get("tokens.quorum", no_ack=False), count())
    assert isinstance(message.delivery, spec.Basic.GetOk)
    await get.basic_nack(message.delivery.delivery_tag, requeue=True, wait=False)


async def get_and_get_waiting(get: aiormq.abc.AbstractChannel,
                              other: aiormq.abc.AbstractChannel) -> None:
    """The quorum get while a get of the (empty) waiting queue runs, with no declare: a
    fresh run without a spare whose last count of the runs waiting was 0."""
    message, empty = await asyncio.gather(get.basic_get("tokens.quorum", no_ack=False),
                                          other.basic_get("waiting", no_ack=False))
    assert isinstance(message.delivery, spec.Basic.GetOk)
    assert not isinstance(empty.delivery, spec.Basic.GetOk)
    await get.basic_nack(message.delivery.delivery_tag, requeue=True, wait=False)


async def declare_made_sure(channel: aiormq.abc.AbstractChannel) -> None:
    declared = await channel.queue_declare("waiting", passive=True)
    assert not declared.message_count
    empty = await channel.basic_get("waiting", no_ack=False)
    assert not isinstance(empty.delivery, spec.Basic.GetOk)


async def get_empty(channel: aiormq.abc.AbstractChannel) -> None:
    empty = await channel.basic_get("waiting", no_ack=False)
    assert not isinstance(empty.delivery, spec.Basic.GetOk)


async def measure(count: int) -> dict[str, Any]:
    with vhost("limit-rounds") as host:
        connection = await aio_pika.connect(host.url)
        try:
            channels = [await (await connection.channel(publisher_confirms=False))
                        .get_underlay_channel() for _ in range(2)]
            first, second = channels
            tx = await (await connection.channel(publisher_confirms=False)).get_underlay_channel()
            await tx.tx_select()
            give_back: list[float] = []
            await first.queue_declare("tokens.quorum", durable=True, arguments=QUORUM)
            await first.queue_declare("tokens.classic", durable=True)
            await first.queue_declare("waiting", durable=True, arguments=QUORUM)
            for queue in ("tokens.quorum", "tokens.classic"):
                await first.basic_publish(TOKEN, exchange="", routing_key=queue,
                                          properties=spec.Basic.Properties(delivery_mode=2))
            requests: dict[str, Callable[[], Awaitable[Any]]] = {
                "get + nack, quorum queue": lambda: get_and_nack(first, "tokens.quorum"),
                "get + nack, classic queue": lambda: get_and_nack(first, "tokens.classic"),
                "get + ack and publish in a transaction, quorum queue":
                    lambda: get_and_give_back(tx, "tokens.quorum", give_back),
                "passive declare": lambda: second.queue_declare("waiting", passive=True),
                "quorum get while a passive declare runs": lambda: get_and_count(first, second),
                "the same, its 0 made sure of with a get":
                    lambda: get_and_count_made_sure(first, second),
                "quorum get while a get of the waiting queue runs":
                    lambda: get_and_get_waiting(first, second),
                "end, nobody waits: passive declare": lambda: second.queue_declare(
                    "waiting", passive=True),
                "end, nobody waits: declare, its 0 made sure of": lambda: declare_made_sure(
                    second),
                "end, nobody waits: get of the waiting queue": lambda: get_empty(second),
            }
            wall: dict[str, list[float]] = {name: [] for name in requests}
            cpu: dict[str, list[float]] = {name: [] for name in requests}
            load_before = os.getloadavg()
            for _ in range(count):
                for name, request in requests.items():
                    began, began_cpu = time.perf_counter(), time.process_time()
                    await request()
                    wall[name].append(time.perf_counter() - began)
                    cpu[name].append(time.process_time() - began_cpu)
            load_after = os.getloadavg()
            wall["of which ack and publish in a transaction"] = give_back
        finally:
            await connection.close()
    return {"wall_ms": {name: summarize_ms(values) for name, values in wall.items()},
            "cpu_ms_mean": {name: round(sum(values) / len(values) * 1e3, 3)
                            for name, values in cpu.items() if values},
            "load_average": {"before": [round(v, 2) for v in load_before],
                             "after": [round(v, 2) for v in load_after]}}


def report(result: dict[str, Any]) -> None:
    rows = [[name, r["n"], r["p50"], r["p90"], result["cpu_ms_mean"].get(name, "")]
            for name, r in result["wall_ms"].items()]
    print_table("one request at a time (wall ms; client CPU ms, mean)",
                ["request", "n", "p50", "p90", "CPU"], rows)
    load = result["load_average"]
    print(f"load average (1, 5, 15 min): before {load['before']}, after {load['after']}")


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--count", type=int, default=300, help="Times each request is made.")
    args = parser.parse_args()
    run_benchmark("limit_rounds", args,
                  lambda a: uvloop.run(measure(a.count)), report)


if __name__ == "__main__":
    main()
