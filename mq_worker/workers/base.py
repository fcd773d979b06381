"""The base worker: takes runs pushed by RabbitMQ, runs them under a limit, reports their lifecycle.

A worker type subclasses `BaseWorker` and implements `run` (start the run's
infrastructure, report it started, wait for it) and `kill_infrastructure`.
Everything else is shared, each part in a module of its own that owns its state:

    registry     worker types, by name (the `mq_worker.workers` entry-point group)
    keeper       every run message taken, through triage, to its settling or its run
    lifecycle    a run's life: held, started, watched, stopped, ended (attempts, fenced)
    reporter     every event, built by the data functions of mq_worker.events
    heartbeats   heartbeats, the watch over peers, the lease (see mq_worker.fencing)
    session      the link to the broker and the sessions of a worker

`BaseWorker` keeps the hooks of worker types, `serve`, `stop` and health, and
composes the rest; what lives only while serving is built inside `serve()`.
"""

from __future__ import annotations

import abc
import builtins
import os
import socket
import time
from dataclasses import dataclass
from importlib.metadata import version as package_version
from typing import Any, ClassVar
from uuid import UUID

import aio_pika.abc
import aiormq.abc
import aiormq.exceptions
import anyio
import anyio.abc
import structlog
from pydantic import BaseModel

from mq_worker import topology
from mq_worker.broker import connect, raise_on_server_cancel
from mq_worker.cancellation import CancelFollower, CancelRegistry
from mq_worker.consumer import Delivery, RunConsumer
from mq_worker.errors import BrokerError, ConfigurationError, TopologyMismatch
from mq_worker.fencing import HeartbeatLease, follow_own_reports
from mq_worker.job_configuration import BaseJobConfiguration, BaseJobTemplate, variables_schema
from mq_worker.messages import RunMessage
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
from mq_worker.workers.keeper import RunKeeper
from mq_worker.workers.lifecycle import FORCED_GRACE_SECONDS, RunSurroundings
from mq_worker.workers.registry import worker_class
from mq_worker.workers.reporter import Reporter, WorkerFacts
from mq_worker.workers.runs import ActiveRun, RunBook, WorkerResult
from mq_worker.workers.session import Link, Session

_SESSION_ERRORS = (
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    RuntimeError,
    TimeoutError,
)
_STABLE_SESSION_SECONDS = 10.0


class _WorkerTypeHooks:
    """A worker type's hooks, as the life of a run calls them."""

    def __init__(self, worker: BaseWorker) -> None:
        self._worker = worker
        self.type = worker.type

    async def run(self, run: RunMessage, configuration: BaseJobConfiguration,
                  task_status: anyio.abc.TaskStatus[str]) -> WorkerResult:
        return await self._worker.run(run, configuration, task_status)

    async def kill(self, infrastructure_pid: str, configuration: BaseJobConfiguration,
                   grace_seconds: float) -> int:
        return await self._worker.kill_infrastructure(infrastructure_pid, configuration,
                                                      grace_seconds)

    def hurry(self, infrastructure_pid: str, longest: float) -> None:
        self._worker.hurry_infrastructure(infrastructure_pid, longest)


@dataclass(frozen=True)
class _Serving:
    """The parts that live while the worker serves."""

    consumer: RunConsumer
    keeper: RunKeeper
    cancels: CancelFollower


class BaseWorker(abc.ABC):
    """A worker of one pool, serving one or more of its queues."""

    type: ClassVar[str]
    job_configuration: ClassVar[builtins.type[BaseJobConfiguration]] = BaseJobConfiguration
    # A model declaring the job variables, when they differ from the configuration's fields.
    job_configuration_variables: ClassVar[builtins.type[BaseModel] | None] = None
    description: ClassVar[str] = ""

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
        self._check_template_fields()
        self.log = structlog.get_logger("mq_worker.worker").bind(worker=self.name, pool=self.pool)
        self.metrics = WorkerMetrics(self.pool, self.queues)
        self._signer = Signer.from_file(
            s.signing_key_file, max_age_seconds=s.signature_max_age_seconds
        ) if s.signing_key_file else None
        self._limiter = anyio.CapacityLimiter(s.limit)
        spool = (open_spool(s.spool_dir, self.name, default_name=self.name == default_worker_name())
                 if s.spool_dir else None)
        self._outbox = Outbox(s.outbox_size, on_pressure=self._on_outbox_pressure, spool=spool)
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
        self.pool_control = PoolControl(self.pool, self.queues, lambda: self._consumer)
        self.pool_control.bind_metrics(self.metrics.registry)
        self._report = Reporter(WorkerFacts(
            worker=self.name, pool=self.pool, queues=self.queues, type=self.type,
            limit=s.limit, hostname=self.hostname, version=_VERSION,
            heartbeat_seconds=s.heartbeat_seconds, paused=self.pool_control.paused_targets,
        ), self._outbox.put)
        self.source = self._report.source
        self._heartbeats = Heartbeats(
            book=self._book, link=self._link, reporter=self._report, outbox=self._outbox,
            limiter=self._limiter, pool=self.pool, worker=self.name,
            heartbeat_seconds=s.heartbeat_seconds, log=self.log,
        )
        self._configurer = Configurer(
            configuration_type=self.job_configuration, template=self.template, pool=self.pool,
            worker=self.name, base_environment=self.base_environment,
            check=self.check_configuration,
        )
        self.ready = anyio.Event()
        self.metrics.bind_gauges(
            in_flight=lambda: len(self._book.active),
            free=lambda: self._limiter.available_tokens,
            outbox=lambda: len(self._outbox),
        )

    # -- worker types ------------------------------------------------------------

    @staticmethod
    def get_worker_class_from_type(worker_type: str) -> builtins.type[BaseWorker] | None:
        """The worker class registered for `worker_type`, or None."""
        return registry.worker_class_from_type(worker_type)

    @staticmethod
    def get_all_available_worker_types() -> list[str]:
        return registry.available_worker_types()

    @classmethod
    def get_default_base_job_template(cls, grace_seconds: float = 30.0) -> dict[str, Any]:
        """The worker type's base job template: every configuration field a variable."""
        variables = variables_schema(cls.job_configuration_variables or cls.job_configuration)
        if "grace_seconds" in variables.get("properties", {}):
            variables["properties"]["grace_seconds"]["default"] = grace_seconds
        return {
            "job_configuration": cls.job_configuration.json_template(),
            "variables": variables,
        }

    def _check_template_fields(self) -> None:
        unknown = set(self.template.job_configuration) - set(self.job_configuration.model_fields)
        if unknown:
            raise ConfigurationError(
                f"job_configuration has fields a {self.type!r} worker does not know: "
                + ", ".join(sorted(unknown))
            )

    @abc.abstractmethod
    async def run(
        self,
        run: RunMessage,
        configuration: BaseJobConfiguration,
        task_status: anyio.abc.TaskStatus[str],
    ) -> WorkerResult:
        """Start `run`, call `task_status.started(infrastructure_pid)`, wait for it to end."""

    async def kill_infrastructure(
        self,
        infrastructure_pid: str,
        configuration: BaseJobConfiguration,
        grace_seconds: float = 30.0,
    ) -> int:
        """Stop a run's infrastructure; return its exit status. Optional for worker types."""
        raise NotImplementedError("this worker type cannot stop infrastructure")

    def hurry_infrastructure(self, infrastructure_pid: str, longest: float) -> None:
        """Shorten a stop in progress: SIGKILL (or the like) within `longest` seconds.

        Optional for worker types; called when the worker is told to stop at once.
        """

    def check_configuration(self, configuration: BaseJobConfiguration) -> None:
        """Refuse a prepared configuration by raising InvalidMessage (hook for worker types)."""

    async def setup(self) -> None:
        """Called once before the worker takes runs."""

    async def teardown(self) -> None:
        """Called once after the worker has stopped."""

    def base_environment(self) -> dict[str, str]:
        """The environment runs start from: the worker's, without its own settings."""
        return {k: v for k, v in os.environ.items() if not k.startswith("MQ_WORKER_")}

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
                        await self._sessions_forever(serving)

                tg.start_soon(_sessions)
                lease = anyio.CancelScope()

                async def _lease() -> None:
                    with lease:
                        await serving.keeper.life.fencing.watch_lease_forever()

                tg.start_soon(_lease)
                await self._stop.wait()
                await self._shutdown(serving)
                sessions.cancel()
                lease.cancel()
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
            limiter=self._limiter,
            window=s.window or 1,
            ack_grace=s.ack_grace,
            handle=take,
            spawn=tg,
            redeclare=self._redeclare_queue,
        )
        if self._outbox.under_pressure:
            consumer.pause("outbox")
        keeper = RunKeeper(
            RunSurroundings(
                worker_type=_WorkerTypeHooks(self), book=self._book, reporter=self._report,
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
        )
        return _Serving(consumer, keeper, cancels)

    async def _shutdown(self, serving: _Serving) -> None:
        serving.keeper.stop_taking()
        self.log.info("stopping: no new runs; giving back runs not started")
        serving.consumer.pause("stopping")
        with anyio.move_on_after(5):
            await serving.consumer.idle()
        await serving.keeper.drain(timeout=self.settings.drain_timeout,
                                   cancel_reason=self._cancel_reason)
        self._report.worker_stopped()
        with anyio.move_on_after(10 if self.connected else 2):
            await self._outbox.wait_empty()
        if len(self._outbox):
            self.log.error("events not yet published when stopping", count=len(self._outbox),
                           spooled=self.settings.spool_dir is not None)
        self.log.info("stopped")

    def _cancel_reason(self) -> str:
        """Why the runs still running when the worker stops are cancelled."""
        if self._fatal_error is not None:
            return f"worker stopping: it cannot serve: {self._fatal_error}"
        return "worker stopping" + (" at once" if self._force.is_set() else ": drain timeout")

    async def _sessions_forever(self, serving: _Serving) -> None:
        urls = self.settings.url
        index, backoff, first = 0, 0.2, True
        while True:
            try:
                connection, index = await connect(
                    urls, name=f"mq_worker {self.name}", tls=self.settings.tls, start=index
                )
            except BrokerError as exc:
                self.log.warning("broker unreachable; retrying", error=str(exc), retry_in=backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except ConfigurationError as exc:  # the TLS files cannot be used
                if first:
                    self._fatal(exc)
                    return
                # Mid-rotation, most likely: runs are going on; retry like a broker error.
                self.log.warning("cannot use the TLS files; retrying", error=str(exc),
                                 retry_in=backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not first:
                self.metrics.reconnects.inc()
            first = False
            session_began = time.monotonic()
            fatal: BaseException | None = None
            try:
                await self._serve_session(connection, serving)
            except* (TopologyMismatch, ConfigurationError) as group:
                fatal = group.exceptions[0]
            except* _SESSION_ERRORS as group:
                self.log.warning(
                    "connection lost; reconnecting",
                    error="; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions),
                )
                if group.subgroup(aiormq.exceptions.InvalidFrameError) is not None:
                    serving.cancels.connection_broke_on_an_undecodable_frame()
            except* Exception:
                self.log.exception("unexpected error in the connection; reconnecting")
            finally:
                self._link.current = None
                self._link.disconnected_at = time.monotonic()
                self.metrics.connected.set(0)
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await connection.close()
            if fatal is not None:
                self._fatal(fatal)
                return
            index += 1  # on a cluster, try another node first
            # A session refused at once (no permission, a queue declared with other
            # arguments by someone else) must not turn into a reconnect storm.
            if time.monotonic() - session_began < _STABLE_SESSION_SECONDS:
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.2

    def _fatal(self, error: BaseException) -> None:
        """An error no reconnection can fix: stop the runs (as on a second signal), then fail."""
        self.log.error("cannot serve", error=str(error))
        self._fatal_error = error
        self.stop(force=True)

    async def _serve_session(self, connection: aio_pika.abc.AbstractConnection,
                             serving: _Serving) -> None:
        # Returned mandatory publishes (a park or dead letter to a deleted queue) must fail.
        channels = [await connection.channel(publisher_confirms=c, on_return_raises=c)
                    for c in (False, True, False, False)]
        raw = [await c.get_underlay_channel() for c in channels]
        session = Session(connection, raw[0], raw[1], raw[2])
        await topology.declare_pool(raw[1], self.pool, self.queues, self.settings.queue_options)
        await self.pool_control.declare(raw[1])
        self.log.info("connected", url=str(connection), queues=self.queues)
        fencing = serving.keeper.life.fencing
        async with anyio.create_task_group() as tg:
            async def _watch(closed: Any) -> None:
                await closed
                raise ConnectionError("the broker closed the connection or a channel")

            tg.start_soon(_watch, connection.closed())
            for channel in channels:
                tg.start_soon(_watch, channel.closed())
            # Before anything unconfirmed goes out: endings peers may have reported are handed over.
            fencing.check_lease()
            tg.start_soon(self._outbox.publish_forever, session.publish)
            # A consumer of the cancel stream or the monitor dropped by the broker ends the session.
            tg.start_soon(raise_on_server_cancel, session.aux, "the cancel stream or the monitor")
            tg.start_soon(self.output.ship_forever, connection)
            await tg.start(serving.cancels.follow, session.aux, session.publish)
            await follow_own_reports(session.aux, self.name, fencing.reported_lost)
            await tg.start(self.pool_control.follow, session.aux, session.publish)
            self._link.current = session
            self.metrics.connected.set(1)
            tg.start_soon(self._heartbeats.monitor.run, session.aux,
                          self.settings.heartbeat_seconds, session.publish)
            tg.start_soon(self.pool_control.maintain, raw[3], session.publish)
            self._report.worker_started()
            tg.start_soon(self._heartbeats.beat_forever)
            tg.start_soon(serving.consumer.run, session.runs, list(self._queue_of))
            self.ready.set()

    async def _redeclare_queue(self, channel: aiormq.abc.AbstractChannel, queue: str) -> None:
        session = self._link.current
        if session is not None:
            await topology.declare_work_queue(
                session.publish, self.pool, self._queue_of[queue], self.settings.queue_options
            )

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
        return int(self._limiter.available_tokens)

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

__all__ = ["FORCED_GRACE_SECONDS", "ActiveRun", "BaseWorker", "WorkerResult", "worker_class"]
