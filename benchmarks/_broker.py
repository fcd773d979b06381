"""The broker as benchmarks administer it: mq_worker.testing, addressed by the
MQ_WORKER_BENCH_HOST, _PORT and _MANAGEMENT variables (default: the local broker)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mq_worker.testing import LocalBroker, VHost

BROKER = LocalBroker.from_environment("MQ_WORKER_BENCH")
HOST = BROKER.host
AMQP_PORT = BROKER.port
MANAGEMENT = BROKER.management_url
USER, PASSWORD = BROKER.user, BROKER.password
management = BROKER.management

__all__ = ["AMQP_PORT", "BROKER", "HOST", "MANAGEMENT", "PASSWORD", "USER", "VHost", "management",
           "vhost"]


@contextmanager
def vhost(prefix: str) -> Iterator[VHost]:
    """A vhost of its own for one benchmark, deleted afterwards."""
    with BROKER.throwaway_vhost(f"bench-{prefix}") as own:
        yield own
