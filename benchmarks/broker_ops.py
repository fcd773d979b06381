"""What each AMQP operation of a run costs the broker: bare operations, broker CPU per message.

    .venv/bin/python -m benchmarks.broker_ops [--count 3000] [--rounds 3] [--only NAME,...]

Each operation is measured on a vhost of its own with plain aiormq (no worker), `count`
messages, and the broker's CPU time (user + system of the Erlang VM, from /proc) taken
over the measured phase only; the rounds are interleaved (A B C ... A B C ...) and the
table gives the median and the range. Deliveries come from a queue pre-loaded (confirmed)
before the phase starts. Events go, like a worker's, to a topic exchange with a
subscriber's exclusive queue bound to it that a no-ack consumer drains, or to a key bound
to nothing (what a run's `pending` and `submitted` cost when nobody subscribes to them).
The broker is shared: other clients' traffic lands in some rounds, so read the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiormq
from pamqp import commands as spec

from benchmarks._broker import VHost, vhost
from benchmarks._machine import background_load, broker_process, cpu_seconds
from benchmarks._reductions import Reading, reductions_between, vhost_reductions
from benchmarks._report import print_table
from benchmarks._runner import command_line, run_benchmark
from mq_worker import confirmed_batch

BODY = b'{"id": "00000000-0000-0000-0000-000000000000", "job_variables": {"command": "/bin/true"}}'
EVENT = b"x" * 420  # about the size of a run's event
PERSISTENT = spec.Basic.Properties(delivery_mode=2, content_type="application/json")
TRANSIENT = spec.Basic.Properties(delivery_mode=1, content_type="application/json")


@dataclass(frozen=True)
class Deliveries:
    queue_type: str  # quorum | classic
    prefetch: int
    ack_every: int  # 1: one basic.ack per message; n: one with `multiple` per n messages

    async def __call__(self, host: VHost, count: int) -> tuple[float, int | None]:
        connection = await aiormq.connect(host.url)
        try:
            channel = await connection.channel()
            await channel.queue_declare("work", durable=True,
                                        arguments={"x-queue-type": self.queue_type})
            await _publish(channel, "", "work", PERSISTENT, BODY, count, confirmed=True)
            done = asyncio.get_running_loop().create_future()
            seen = 0

            async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
                nonlocal seen
                seen += 1
                if seen % self.ack_every == 0 or seen == count:
                    tag = message.delivery_tag
                    assert tag is not None
                    await channel.basic_ack(tag, multiple=self.ack_every > 1)
                if seen == count and not done.done():
                    done.set_result(None)

            await channel.basic_qos(prefetch_count=self.prefetch)
            before = cpu_seconds(broker_process()), vhost_reductions(host.name)
            await channel.basic_consume("work", on_message)
            await done
            return _since(before, host)
        finally:
            await connection.close()


@dataclass(frozen=True)
class Events:
    properties: spec.Basic.Properties
    confirmed: bool
    subscribed: bool  # a subscriber's queue is bound to the key
    per_write: int = 3  # a run's three events, written together

    async def __call__(self, host: VHost, count: int) -> tuple[float, int | None]:
        connection = await aiormq.connect(host.url)
        try:
            subscriber = await connection.channel()
            await subscriber.exchange_declare("events", exchange_type="topic", durable=True)
            queue = (await subscriber.queue_declare("", exclusive=True, auto_delete=True)).queue
            await subscriber.queue_bind(queue, "events", routing_key="run.#")
            await subscriber.basic_consume(queue, lambda message: _noop(), no_ack=True)
            channel = await connection.channel(publisher_confirms=self.confirmed)
            key = "run.completed" if self.subscribed else "nobody.listens"
            before = cpu_seconds(broker_process()), vhost_reductions(host.name)
            await _publish(channel, "events", key, self.properties, EVENT, count,
                           confirmed=self.confirmed, per_write=self.per_write)
            return _since(before, host)
        finally:
            await connection.close()


def _since(before: tuple[float, Reading | None],
           host: VHost) -> tuple[float, int | None]:
    """Broker CPU seconds and the vhost's reductions since `before`."""
    return (cpu_seconds(broker_process()) - before[0],
            reductions_between(before[1], vhost_reductions(host.name)))


async def _noop() -> None:
    return None


async def _publish(channel: Any, exchange: str, key: str, properties: spec.Basic.Properties,
                   body: bytes, count: int, *, confirmed: bool, per_write: int = 64) -> None:
    """`count` messages, `per_write` to a socket write, up to 256 unconfirmed at a time."""
    pending: list[asyncio.Future[Any]] = []
    for start in range(0, count, per_write):
        batch = [confirmed_batch.Message(exchange, key, body, str(properties.content_type),
                                         f"m{start + i}",
                                         persistent=properties.delivery_mode == 2)
                 for i in range(min(per_write, count - start))]
        if confirmed:
            pending += await confirmed_batch.publish(channel, batch)
            if len(pending) >= 256:
                await asyncio.gather(*pending)
                pending = []
        else:
            for message in batch:  # a write each, as Celery's events go
                await channel.basic_publish(message.body, exchange=message.exchange,
                                            routing_key=message.routing_key,
                                            properties=properties)
    await asyncio.gather(*pending)
    if not confirmed:
        await channel.basic_qos(prefetch_count=0)  # a round trip: everything before it arrived


Operation = Callable[[VHost, int], Awaitable[tuple[float, int | None]]]
OPERATIONS: dict[str, tuple[str, Operation]] = {
    "quorum-ack-each-p2": ("quorum queue: deliver + basic.ack each, prefetch 2",
                           Deliveries("quorum", 2, 1)),
    "quorum-ack-multiple-2": ("quorum queue: deliver, one ack with multiple per 2, prefetch 2",
                              Deliveries("quorum", 2, 2)),
    "quorum-ack-each-p8": ("quorum queue: deliver + basic.ack each, prefetch 8",
                           Deliveries("quorum", 8, 1)),
    "quorum-ack-multiple-8": ("quorum queue: deliver, one ack with multiple per 8, prefetch 8",
                              Deliveries("quorum", 8, 8)),
    "classic-ack-each-p8": ("classic queue: deliver + basic.ack each, prefetch 8 (Celery's)",
                            Deliveries("classic", 8, 1)),
    "event-persistent-confirmed": ("event to a subscriber: persistent, confirmed, 3 a write",
                                   Events(PERSISTENT, True, True)),
    "event-transient-confirmed": ("event to a subscriber: transient, confirmed, 3 a write",
                                  Events(TRANSIENT, True, True)),
    "event-transient-unconfirmed": ("event to a subscriber: transient, unconfirmed, a write "
                                    "each (Celery -E)",
                                    Events(TRANSIENT, False, True)),
    "event-unrouted-confirmed": ("event bound to no queue: persistent, confirmed, 3 a write",
                                 Events(PERSISTENT, True, False)),
    "event-unrouted-transient-confirmed": ("event bound to no queue: transient, confirmed, "
                                           "3 a write",
                                           Events(TRANSIENT, True, False)),
    "event-unrouted-unconfirmed": ("event bound to no queue: transient, unconfirmed, a write "
                                   "each (Celery -E with no monitor)",
                                   Events(TRANSIENT, False, False)),
}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    names = args.only.split(",") if args.only else list(OPERATIONS)
    load_before = background_load()
    cpu: dict[str, list[float]] = {name: [] for name in names}
    reductions: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            with vhost(f"ops-{name}") as host:
                seconds, counted = await OPERATIONS[name][1](host, args.count)
            cpu[name].append(seconds / args.count * 1e6)
            if counted is not None:
                reductions[name].append(counted / args.count)
            print(f"  {name}: {cpu[name][-1]:.1f} µs of broker CPU, "
                  f"{counted and counted / args.count:.0f} reductions per message", flush=True)
    return {"count": args.count, "rounds": args.rounds,
            "other_load_cores": [load_before, background_load()],
            "broker_us_per_message": cpu, "reductions_per_message": reductions}


def report(result: dict[str, Any]) -> None:
    cpu: dict[str, list[float]] = result["broker_us_per_message"]
    reductions: dict[str, list[float]] = result["reductions_per_message"]
    before, after = result["other_load_cores"]

    def spread(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    print_table(f"{result['count']} messages per operation, {result['rounds']} interleaved "
                f"round(s); other load {before:.2f} cores before, {after:.2f} after",
                ["operation", "broker CPU µs per message: median (range)",
                 "reductions per message: median (range)"],
                [[OPERATIONS[name][0], spread(cpu[name]), spread(reductions[name])]
                 for name in cpu])


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated operation names: " + ", ".join(OPERATIONS))
    run_benchmark("broker_ops", parser.parse_args(), measure, report)


if __name__ == "__main__":
    main()
