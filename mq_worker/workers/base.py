"""The base worker: takes runs pushed by RabbitMQ, runs them under a limit, reports their lifecycle.

A worker type subclasses `BaseWorker` and implements `run` (start the run's
infrastructure, report it started, wait for it) and `kill_infrastructure`.
Everything else is shared, each part in a module of its own that owns its state:

    hooks        what a worker type implements, and the defaults of what it need not
    registry     worker types, by name (the `mq_worker.workers` entry-point group)
    keeper       every run message taken, through triage, to its settling or its run
    lifecycle    a run's life: held, started, watched, stopped, ended (attempts, fenced)
    reporter     every event, built by the data functions of mq_worker.events
    heartbeats   heartbeats, the watch over peers, the lease (see mq_worker.fencing)
    session      the link to the broker and the sessions of a worker

`BaseWorker` has the hooks of worker types (from `WorkerTypeHooks`), keeps `serve`,
`stop` and health, and composes the rest; what lives only while serving is built inside `serve()`.
"""

from __future__ import annotations

import builtins
import socket
from dataclasses import dataclass
from importlib.metadata import version as package_version
from typing import Any
from uuid import UUID

import aiormq.abc
import anyio
import anyio.abc
import structlog

from mq_worker import topology
from mq_worker.cancellation import CancelFollower, CancelRegistry
from mq_worker.consumer import Delivery, RunConsumer
from mq_worker.events import OutgoingEvent
from mq_worker.fencing import HeartbeatLease
from mq_worker.job_configuration import BaseJobTemplate
from mq_worker.metrics import WorkerMetrics
from mq_worker.outbox import Outbox
from mq_worker.output import OutputShipper
from mq_worker.pool_control import PoolControl
from mq_worker.settings import WorkerSettings, default_worker_name
from mq_worker.signing import Signer
from mq_worker.spool import open_spool
from mq_worker.workers import registry
from mq_worker.workers.configuring import Configurer
from mq_worker.workers.heartbeats import Heartbeats
from mq_worker.workers.hooks import WorkerTypeHooks
from mq_worker.workers.keeper import RunKeeper
from mq_worker.workers.lifecycle import FORCED_GRACE_SECONDS, RunSurroundings
from mq_worker.workers.link import Link
from mq_worker.workers.reporter import Reporter, WorkerFacts
from mq_worker.workers.runs import ActiveRun, RunBook, WorkerResult
from mq_worker.workers.session import FATAL_ERRORS, SessionSupervisor


@dataclass(frozen=True)
class _Serving:
    """The parts that live while the worker serves."""

    consumer: RunConsumer
    keeper: RunKeeper
    cancels: CancelFollower
    sessions: SessionSupervisor


class BaseWorker(WorkerTypeHooks):
    """A worker of one pool, serving one or more of its queues."""

    def __init__(
        self,
        settings: WorkerSettings | None = None,
        *,
        base_job_template: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings or WorkerSettings()
        s = self.settings
        self.name = s.name
        self.pool = s.pool
        self.queues = list(s.queue)
        self.hostname = socket.gethostname()
        if base_job_template is None and s.job_template is not None:
            self.template = BaseJobTemplate.from_file(s.job_template)
        else:
            self.template = BaseJobTemplate.from_dict(
                base_job_template or self.get_default_base_job_template(s.grace_seconds)
            )
        self._configurer = Configurer(
            worker_type=self.type, configuration_type=self.job_configuration,
            template=self.template, pool=self.pool, worker=self.name,
            base_environment=self.base_environment, check=self.check_configuration,
        )
        self.log = structlog.get_logger("mq_worker.worker").bind(worker=self.name, pool=self.pool)
        self.metrics = WorkerMetrics(self.pool, self.queues)
        self._signer = Signer.from_file(
            s.signing_key_file, max_age_seconds=s.signature_max_age_seconds
        ) if s.signing_key_file else None
        spool = (open_spool(s.spool_dir, self.name, default_name=self.name == default_worker_name())
                 if s.spool_dir else None)
        self._outbox = Outbox(s.outbox_size, on_pressure=self._on_outbox_pressure, spool=spool,
                              sign=self._signed_worker_event if self._signer else None)
        self.output = OutputShipper(pool=self.pool, worker=self.name,
                                    max_run_bytes=s.output_max_bytes,
                                    registry=self.metrics.registry)
        self._registry = CancelRegistry(window_seconds=s.cancel_window_seconds)
        self._book = RunBook()
        self._link = Link()
        self._queue_of = {topology.work_queue_name(self.pool, q): q for q in self.queues}
        self._stop = anyio.Event()
        self._force = anyio.Event()
        self._serving: _Serving | None = None
        self._fatal_error: BaseException | None = None
        self.pool_control = PoolControl(self.pool, self.queues, lambda: self._consumer,
                                        on_slot_lost=self._on_slot_lost)
        self.pool_control.bind_metrics(self.metrics.registry)
        self._report = Reporter(WorkerFacts(
            worker=self.name, pool=self.pool, queues=self.queues, type=self.type,
            limit=s.limit, hostname=self.hostname, version=_VERSION,
            heartbeat_seconds=s.heartbeat_seconds, paused=self.pool_control.paused_targets,
        ), self._outbox.put, start_events=s.run_events == "all")
        self.source = self._report.source
        self._heartbeats = Heartbeats(
            book=self._book, link=self._link, reporter=self._report, outbox=self._outbox,
            free_slots=lambda: self.free_slots, pool=self.pool, worker=self.name,
            heartbeat_seconds=s.heartbeat_seconds, max_peers=s.reporter_max_peers,
            signer=self._signer, log=self.log,
        )
        self.ready = anyio.Event()
        self.metrics.bind_gauges(
            in_flight=lambda: len(self._book.active),
            free=lambda: self.free_slots,
            outbox=lambda: len(self._outbox),
        )

    # -- worker types ------------------------------------------------------------

    @staticmethod
    def get_worker_class_from_type(worker_type: str) -> builtins.type[BaseWorker] | None:
        """The worker class registered for `worker_type`, or None."""
        return registry.worker_class_from_type(worker_type, BaseWorker)  # type: ignore[type-abstract]

    @staticmethod
    def get_all_available_worker_types() -> list[str]:
        return registry.available_worker_types()

    # -- serving ---------------------------------------------------------------

    def stop(self, *, force: bool = False) -> None:
        """Ask the worker to stop: gracefully, or at once (still settling every message)."""
        if self._stop.is_set() or force:
            self._force.set()
        self._stop.set()

    async def serve(self) -> None:
        """Take runs until `stop()`; then give back what has not started and drain."""
        await self.setup()
        try:
            async with anyio.create_task_group() as tg:
                serving = self._serving = self._start_serving(tg)
                sessions = anyio.CancelScope()

                async def _sessions() -> None:
                    with sessions:
                        try:
                            await serving.sessions.run_forever()
                        except FATAL_ERRORS as exc:
                            self._fail(exc)

                tg.start_soon(_sessions)
                lease = anyio.CancelScope()

                async def _lease() -> None:  # what stops runs of a worker cut off too long
                    with lease:
                        async with anyio.create_task_group() as watches:
                            watches.start_soon(self.pool_control.gate.stop_runs_cut_off)
                            await serving.keeper.life.fencing.watch_lease_forever()

                tg.start_soon(_lease)
                await self._stop.wait()
                await self._shutdown(serving)
                sessions.cancel()
                lease.cancel()
                serving.consumer.end_handlers()
        finally:
            self._outbox.close()
            await self.teardown()
        if self._fatal_error is not None:
            raise self._fatal_error

    def _start_serving(self, tg: anyio.abc.TaskGroup) -> _Serving:
        """The parts that live while serving, wired to each other."""
        s = self.settings

        async def take(delivery: Delivery) -> None:
            await keeper.take(delivery)

        consumer = RunConsumer(
            limit=s.limit,
            window=s.narrow_window,
            wide_window=s.wide_window,
            ack_grace=s.ack_grace,
            handle=take,
            spawn=tg,
            redeclare=self._redeclare_queue,
        )
        if self._outbox.under_pressure:
            consumer.pause("outbox")
        keeper = RunKeeper(
            RunSurroundings(
                worker_type=self, book=self._book, reporter=self._report,
                metrics=self.metrics, link=self._link, lease=self._heartbeats.lease,
                outbox=self._outbox, signer=self._signer, pool=self.pool, worker=self.name,
                prefetch_seconds=s.prefetch_seconds, heartbeat_seconds=s.heartbeat_seconds,
                template_defaults=self.template.defaults, consumer=consumer, force=self._force,
                spawn=tg, log=self.log,
            ),
            configurer=self._configurer, cancels=self._registry, pool_control=self.pool_control,
            queue_of=self._queue_of, max_message_bytes=s.max_message_bytes,
        )
        cancels = CancelFollower(
            pool=self.pool,
            registry=self._registry,
            on_cancel=keeper.on_cancel,
            on_invalid=keeper.on_invalid_cancel,
            verify=self._signer.cancel_verifier(self.pool, s.cancel_window_seconds)
            if self._signer else None,
            max_bytes=s.max_message_bytes,
            keeps_snapshots=lambda: self._heartbeats.monitor.elected,
            connection_name=f"mq_worker {self.name}",
        )
        sessions = SessionSupervisor(
            settings=s, link=self._link, consumer=consumer, queue_names=list(self._queue_of),
            cancels=cancels, fencing=keeper.life.fencing, heartbeats=self._heartbeats,
            pool_control=self.pool_control, outbox=self._outbox, output=self.output,
            reporter=self._report, metrics=self.metrics, ready=self.ready, log=self.log,
        )
        return _Serving(consumer, keeper, cancels, sessions)

    def _on_slot_lost(self, run_id: str, target: str) -> None:
        if self._serving is not None:
            self._serving.keeper.life.slot_lost(UUID(run_id), target)

    def _fail(self, error: Exception) -> None:
        """An error no reconnection can fix: stop the runs (as on a second signal), then
        raise it from `serve()`."""
        self.log.error("cannot serve", error=str(error))
        self._fatal_error = error
        self.stop(force=True)

    async def _shutdown(self, serving: _Serving) -> None:
        serving.keeper.stop_taking()
        self.log.info("stopping: no new runs; giving back runs not started")
        serving.consumer.pause("stopping")
        with anyio.move_on_after(5):
            await serving.consumer.idle()
        await serving.keeper.drain(timeout=self.settings.drain_timeout,
                                   cancel_reason=self._cancel_reason)
        self._report.worker_stopped()
        # The runs have ended, their output's last batches are sealed: events and output
        # leave before the connection closes (output on its own channel, in parallel).
        with anyio.move_on_after(10 if self.connected else 2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._outbox.wait_empty)
                tg.start_soon(self.output.flush)
        if len(self._outbox):
            self.log.error("events not yet published when stopping", count=len(self._outbox),
                           spooled=self.settings.spool_dir is not None)
        batches, lines = self.output.abandon()
        if batches:
            self.log.error("run output not shipped when stopping: dropped", batches=batches,
                           lines=lines)
        self.log.info("stopped")

    def _cancel_reason(self) -> str:
        """Why the runs still running when the worker stops are cancelled."""
        if self._fatal_error is not None:
            return f"worker stopping: it cannot serve: {self._fatal_error}"
        return "worker stopping" + (" at once" if self._force.is_set() else ": drain timeout")

    async def _redeclare_queue(self, channel: aiormq.abc.AbstractChannel, queue: str) -> None:
        session = self._link.current
        if session is not None:
            await topology.declare_work_queue(
                session.publish, self.pool, self._queue_of[queue], self.settings.queue_options
            )

    def _signed_worker_event(self, event: OutgoingEvent) -> dict[str, str]:
        """Worker events are signed: the reporter and fencing act on no others."""
        if self._signer is None or not event.type.startswith(topology.WORKER_EVENT_PREFIX):
            return {}
        return self._signer.headers(event.body, kind="worker", pool=self.pool)

    def _on_outbox_pressure(self, pressure: bool) -> None:
        if self._serving is None:
            return  # serve() pauses the consumer it builds if the outbox is full
        if pressure:
            self._serving.consumer.pause("outbox")
        else:
            self._serving.consumer.resume("outbox")

    # -- status ------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """(healthy, reason) for the health endpoint."""
        serving = self._serving
        if serving is not None and serving.keeper.stopping:
            return False, "stopping"
        if not self.connected:
            return False, "not connected to the broker (reconnecting)"
        if self._outbox.under_pressure:
            return False, "outbox full: events cannot be published"
        if serving is None:
            return False, "not consuming"
        paused = serving.consumer.paused
        if paused:
            return False, "not consuming: " + ", ".join(sorted(paused))
        return True, "consuming"

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def in_flight(self) -> list[UUID]:
        return list(self._book.active)

    @property
    def free_slots(self) -> int:
        consumer = self._consumer
        return consumer.free_slots if consumer is not None else self.settings.limit

    # For operators' tools and tests: the parts of a serving worker.

    @property
    def _consumer(self) -> RunConsumer | None:
        return self._serving.consumer if self._serving else None

    @property
    def _cancels(self) -> CancelFollower | None:
        return self._serving.cancels if self._serving else None

    @property
    def _lease(self) -> HeartbeatLease:
        return self._heartbeats.lease


def _package_version() -> str:
    try:
        return package_version("mq-worker")
    except Exception:
        return "0+unknown"


_VERSION = _package_version()


def worker_class(worker_type: str) -> type[BaseWorker]:
    """The worker class registered for `worker_type` (see mq_worker.workers.registry)."""
    return registry.worker_class(worker_type, BaseWorker)  # type: ignore[type-abstract]


__all__ = ["FORCED_GRACE_SECONDS", "ActiveRun", "BaseWorker", "WorkerResult", "worker_class"]
