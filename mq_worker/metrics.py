"""Prometheus metrics of one worker (each worker has its own registry).

Besides the worker's own metrics the registry has prometheus-client's process, platform
and GC collectors (`process_resident_memory_bytes`, `python_info`, ...) and
`mq_worker_build_info`. Every labelled counter and histogram has its children for the
worker's pool and queues from the start, at zero, so that `rate(...)` sees a series on a
fresh worker.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector


def package_version() -> str:
    try:
        return version("mq-worker")
    except PackageNotFoundError:
        return "unknown"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """The children of the labelled metrics for one pool and queue: what a run counts."""

    pending: Counter
    started: Counter
    completed: Counter
    crashed: Counter
    cancelled: Counter
    rejected: Counter
    parked: Counter
    retries: Counter
    timeouts: Counter
    start_latency: Histogram
    duration: Histogram


class WorkerMetrics:
    def __init__(self, pool: str | None = None, queues: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        if GC_COLLECTOR is not None:
            GCCollector(registry=self.registry)
        self.build = Info("mq_worker_build", "The running mq_worker.", registry=self.registry)
        self.build.info({"version": package_version(),
                         "python_version": platform.python_version()})
        labels = ("pool", "queue")

        def runs(name: str, doc: str) -> Counter:
            return Counter(f"mq_worker_runs_{name}", doc, labels, registry=self.registry)

        self.pending = runs("pending", "Runs taken by this worker.")
        self.started = runs("started", "Runs whose process started.")
        self.completed = runs("completed", "Runs that exited with 0.")
        self.crashed = runs("crashed", "Runs that failed to start or exited non-zero.")
        self.cancelled = runs("cancelled", "Runs stopped or dropped by a cancel.")
        self.rejected = runs("rejected", "Messages rejected as invalid.")
        self.parked = runs("parked", "Runs parked in the broker until due.")
        self.retries = runs("retries", "Failed attempts whose next attempt was scheduled.")
        self.timeouts = runs("timeouts", "Attempts stopped for running past timeout_seconds.")
        self.in_flight = Gauge(
            "mq_worker_runs_in_flight", "Runs held or running.", registry=self.registry
        )
        self.free_slots = Gauge("mq_worker_free_slots", "Free run slots.", registry=self.registry)
        self.start_latency = Histogram(
            "mq_worker_publish_to_start_seconds",
            "From publish (message timestamp) or due time to process start.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "mq_worker_run_duration_seconds",
            "From process start to exit.",
            labels,
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.outbox_depth = Gauge(
            "mq_worker_outbox_depth", "Events waiting for the broker.", registry=self.registry
        )
        self.reconnects = Counter(
            "mq_worker_reconnects", "Connections re-established.", registry=self.registry
        )
        self.refused_reports = Counter(
            "mq_worker_refused_lost_reports",
            "worker.lost reports about this worker refused: unsigned or badly signed.",
            registry=self.registry,
        )
        self.connected = Gauge(
            "mq_worker_connected", "1 while connected to the broker.", registry=self.registry
        )

        # `labels()` takes a lock and builds its key on every call: a run's several
        # counts look their children up once per queue instead.
        self._of_queue: dict[tuple[str, str], QueueMetrics] = {}
        if pool is not None:
            self._create_children(pool, queues)

    def of(self, pool: str, queue: str) -> QueueMetrics:
        """The metrics of runs from `queue` of `pool`."""
        found = self._of_queue.get((pool, queue))
        if found is None:
            found = self._of_queue[(pool, queue)] = QueueMetrics(
                pending=self.pending.labels(pool, queue),
                started=self.started.labels(pool, queue),
                completed=self.completed.labels(pool, queue),
                crashed=self.crashed.labels(pool, queue),
                cancelled=self.cancelled.labels(pool, queue),
                rejected=self.rejected.labels(pool, queue),
                parked=self.parked.labels(pool, queue),
                retries=self.retries.labels(pool, queue),
                timeouts=self.timeouts.labels(pool, queue),
                start_latency=self.start_latency.labels(pool, queue),
                duration=self.duration.labels(pool, queue),
            )
        return found

    def _create_children(self, pool: str, queues: Sequence[str]) -> None:
        labelled = (self.pending, self.started, self.completed, self.crashed, self.cancelled,
                    self.rejected, self.parked, self.start_latency, self.duration)
        for queue in queues:
            for metric in labelled:
                metric.labels(pool, queue)
        self.rejected.labels(pool, "")  # messages rejected before their queue is known

    def bind_gauges(
        self, *, in_flight: Callable[[], float], free: Callable[[], float],
        outbox: Callable[[], float],
    ) -> None:
        self.in_flight.set_function(in_flight)
        self.free_slots.set_function(free)
        self.outbox_depth.set_function(outbox)

    def render(self) -> bytes:
        return generate_latest(self.registry)
