"""The base worker: takes runs pushed by RabbitMQ, runs them under a limit, reports their lifecycle.

A worker type subclasses `BaseWorker` and implements `run` (start the run's
infrastructure, report it started, wait for it) and `kill_infrastructure`.
Everything else is shared: connections and reconnection, the flow-controlled
consumer, cancels, parking, events, heartbeats and graceful stop. Worker types
are found through the `mq_worker.workers` entry-point group.

The life of a run on a worker:

    delivered -> (rejected | cancelled | parked)            message settled, no slot kept
    delivered -> pending -> held until due -> submitted -> completed | crashed | cancelled
"""

from __future__ import annotations

import abc
import builtins
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import entry_points
from importlib.metadata import version as package_version
from typing import Any, ClassVar, NamedTuple
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
from mq_worker.cancellation import CancelFollower, CancelRecord, CancelRegistry
from mq_worker.consumer import Delivery, RunConsumer
from mq_worker.delay import park, park_seconds
from mq_worker.errors import (
    BrokerError,
    ConfigurationError,
    InfrastructureNotAvailable,
    InfrastructureNotFound,
    InvalidMessage,
    TopologyMismatch,
)
from mq_worker.events import CrashReason, EventType, build_event, worker_source
from mq_worker.fencing import (
    REPORTED_STATES,
    HeartbeatLease,
    follow_own_reports,
    worker_lost_ending,
    worker_lost_event_id,
)
from mq_worker.handoff import (
    CONFIRM_TIMEOUT,
    HandoffReturned,
    fit_headers,
    frame_max_of,
    hand_off,
)
from mq_worker.invalid_events import InvalidWorkerEvents
from mq_worker.job_configuration import (
    BaseJobConfiguration,
    BaseJobTemplate,
    RunContext,
    variables_schema,
)
from mq_worker.messages import RunMessage
from mq_worker.metrics import WorkerMetrics
from mq_worker.monitor import PeerRecord, PoolMonitor
from mq_worker.outbox import Outbox
from mq_worker.output import OutputShipper
from mq_worker.policies import NO_POLICY, RunPolicy, failure_message, failure_reason
from mq_worker.pool_control import PoolControl
from mq_worker.redaction import masked_job_variables
from mq_worker.resources import SpawnBackoff, is_transient_spawn_error
from mq_worker.retrying import (
    WaitingRetries,
    WaitingRetry,
    park_next_attempt,
    publish_cancel_reported,
)
from mq_worker.settings import WorkerSettings, default_worker_name
from mq_worker.signing import Signer, parse_signed_run
from mq_worker.slots import Lease, Waiting
from mq_worker.spool import open_spool

ENTRY_POINT_GROUP = "mq_worker.workers"
_FINISHED_MEMORY = 50_000
_MAX_REASON_CHARS = 2048
_SESSION_ERRORS = (
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    RuntimeError,
    TimeoutError,
)


_STABLE_SESSION_SECONDS = 10.0
_SPAWN_PAUSE = "resources exhausted at spawn"
# The longest grace a run still gets once the worker is told to stop at once.
FORCED_GRACE_SECONDS = 5.0
# How long a retry waits for a connection to park its next attempt before giving up.
_RETRY_SESSION_WAIT_SECONDS = 30.0


class WorkerResult(NamedTuple):
    """What a run's infrastructure reported when it ended."""

    identifier: str
    status_code: int


@dataclass(eq=False)
class ActiveRun:
    """A run this worker holds: waiting for its start time, starting or running."""

    run: RunMessage
    delivery: Delivery
    queue: str
    configuration: BaseJobConfiguration
    log: Any
    related: list[dict[str, Any]]
    state: str = "held"
    infrastructure_pid: str | None = None
    started_at: float | None = None
    cancel: CancelRecord | None = None
    killed: bool = False
    kill_started: bool = False
    # Its worker may have been reported lost with it: it ends as `crashed` (worker-lost).
    fenced: bool = False
    fenced_since: float = 0.0
    terminal: bool = False
    last_event_id: str | None = None
    wake: anyio.Event = field(default_factory=anyio.Event)
    policy: RunPolicy = NO_POLICY
    timed_out: bool = False
    timeout_timer: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    retry_settled: anyio.Event = field(default_factory=anyio.Event)

    @property
    def id(self) -> UUID:
        return self.run.id


class _Session:
    """The channels of one live connection."""

    def __init__(
        self,
        connection: aio_pika.abc.AbstractConnection,
        runs: aiormq.abc.AbstractChannel,
        publish: aiormq.abc.AbstractChannel,
        aux: aiormq.abc.AbstractChannel,
    ) -> None:
        self.connection = connection
        self.runs = runs
        self.publish = publish
        self.aux = aux
        self.ladder_declared = False
        self.ladder_lock = anyio.Lock()


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
        self.source = worker_source(self.name)
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
        self._active: dict[UUID, ActiveRun] = {}
        self._retry_waits = WaitingRetries()
        self._finished: OrderedDict[UUID, str] = OrderedDict()
        self._contexts: dict[str, RunContext] = {}
        self._queue_of = {topology.work_queue_name(self.pool, q): q for q in self.queues}
        self._session: _Session | None = None
        self._stop = anyio.Event()
        self._force = anyio.Event()
        self._stopping = False
        self._started_event_id: str | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._consumer: RunConsumer | None = None
        self.pool_control = PoolControl(self.pool, self.queues, lambda: self._consumer)
        self.pool_control.bind_metrics(self.metrics.registry)
        self._monitor = PoolMonitor(
            pool=self.pool, me=self.name, on_lost=self._report_lost, on_ping=self._heartbeat,
            on_invalid=InvalidWorkerEvents(
                pool=self.pool, me=self.name,
                publisher=lambda: self._session.publish if self._session else None,
                emit=lambda reason: self._emit_rejected(None, reason, None, kind="worker-event"),
            ),
        )
        self._cancels = CancelFollower(
            pool=self.pool,
            registry=self._registry,
            on_cancel=self._on_cancel,
            on_invalid=self._on_invalid_cancel,
            verify=self._signer.cancel_verifier(self.pool, s.cancel_window_seconds)
            if self._signer else None,
            max_bytes=s.max_message_bytes,
            keeps_snapshots=lambda: self._monitor.elected,
        )
        # Margin: the lease breaks a little before a peer's report can come.
        missed = self._monitor.missed
        self._lease = HeartbeatLease(
            missed * s.heartbeat_seconds - min(1.0, 0.1 * s.heartbeat_seconds)
        )
        self._reported_lost: OrderedDict[str, None] = OrderedDict()
        # Of recently ended runs: the id a peer's worker-lost report would give them.
        self._ended_pids: OrderedDict[str, str | None] = OrderedDict()
        self._disconnected_at = 0.0
        self._spawn_backoff = SpawnBackoff()
        self._fatal_error: BaseException | None = None
        self.connected = False
        self.ready = anyio.Event()
        self._runs_changed = anyio.Event()
        self.metrics.bind_gauges(
            in_flight=lambda: len(self._active),
            free=lambda: self._limiter.available_tokens,
            outbox=lambda: len(self._outbox),
        )

    # -- worker types ------------------------------------------------------------

    @staticmethod
    def get_worker_class_from_type(worker_type: str) -> builtins.type[BaseWorker] | None:
        """The worker class registered for `worker_type`, or None."""
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name == worker_type:
                cls: Any = entry_point.load()
                if not (isinstance(cls, type) and issubclass(cls, BaseWorker)):
                    raise ConfigurationError(f"{entry_point.value} is not a BaseWorker")
                return cls
        return None

    @staticmethod
    def get_all_available_worker_types() -> list[str]:
        return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})

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
                self._tg = tg
                self._consumer = RunConsumer(
                    limiter=self._limiter,
                    window=self.settings.window or 1,
                    ack_grace=self.settings.ack_grace,
                    handle=self._handle_delivery,
                    spawn=tg,
                    redeclare=self._redeclare_queue,
                )
                if self._outbox.under_pressure:
                    self._consumer.pause("outbox")
                sessions = anyio.CancelScope()

                async def _sessions() -> None:
                    with sessions:
                        await self._sessions_forever()

                tg.start_soon(_sessions)
                lease = anyio.CancelScope()

                async def _lease() -> None:
                    with lease:
                        await self._lease_loop()

                tg.start_soon(_lease)
                await self._stop.wait()
                await self._shutdown()
                sessions.cancel()
                lease.cancel()
        finally:
            self._outbox.close()
            await self.teardown()
        if self._fatal_error is not None:
            raise self._fatal_error

    async def _shutdown(self) -> None:
        self._stopping = True
        self.log.info("stopping: no new runs; giving back runs not started")
        assert self._consumer is not None
        self._consumer.pause("stopping")
        with anyio.move_on_after(5):
            await self._consumer.idle()
        for active in list(self._active.values()):
            if active.state == "held":
                active.wake.set()
        running = [a for a in self._active.values() if a.state != "held"]
        if running:
            self.log.info("waiting for running runs", count=len(running))
        with anyio.move_on_after(
            self.settings.drain_timeout if self.settings.drain_timeout is not None else float("inf")
        ):
            async with anyio.create_task_group() as tg:
                async def _force() -> None:
                    await self._force.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(_force)
                while self._active:
                    await self._wait_runs_change()
                tg.cancel_scope.cancel()
        if self._active:
            reason = "worker stopping" + (" at once" if self._force.is_set() else ": drain timeout")
            if self._fatal_error is not None:
                reason = f"worker stopping: it cannot serve: {self._fatal_error}"
            self.log.warning("cancelling runs still running", count=len(self._active))
            for active in list(self._active.values()):
                self._request_cancel(active, CancelRecord(active.id, reason, time.time()))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._hurry_when_forced)
                while self._active:
                    await self._wait_runs_change()
                tg.cancel_scope.cancel()
        self._emit_worker(EventType.WORKER_STOPPED)
        with anyio.move_on_after(10 if self.connected else 2):
            await self._outbox.wait_empty()
        if len(self._outbox):
            self.log.error("events not yet published when stopping", count=len(self._outbox),
                           spooled=self.settings.spool_dir is not None)
        self.log.info("stopped")

    async def _hurry_when_forced(self) -> None:
        """A second signal shortens every grace, also of stops already under way."""
        await self._force.wait()
        for active in list(self._active.values()):
            if active.infrastructure_pid is not None:
                self.hurry_infrastructure(active.infrastructure_pid, FORCED_GRACE_SECONDS)

    async def _wait_runs_change(self) -> None:
        self._runs_changed = anyio.Event()
        await self._runs_changed.wait()

    def _notify_runs_changed(self) -> None:
        self._runs_changed.set()

    async def _sessions_forever(self) -> None:
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
                await self._serve_session(connection)
            except* (TopologyMismatch, ConfigurationError) as group:
                fatal = group.exceptions[0]
            except* _SESSION_ERRORS as group:
                self.log.warning(
                    "connection lost; reconnecting",
                    error="; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions),
                )
                if group.subgroup(aiormq.exceptions.InvalidFrameError) is not None:
                    self._cancels.connection_broke_on_an_undecodable_frame()
            except* Exception:
                self.log.exception("unexpected error in the connection; reconnecting")
            finally:
                self.connected = False
                self._disconnected_at = time.monotonic()
                self.metrics.connected.set(0)
                self._session = None
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

    async def _serve_session(self, connection: aio_pika.abc.AbstractConnection) -> None:
        # Returned mandatory publishes (a park or dead letter to a deleted queue) must fail.
        channels = [await connection.channel(publisher_confirms=c, on_return_raises=c)
                    for c in (False, True, False, False)]
        raw = [await c.get_underlay_channel() for c in channels]
        session = _Session(connection, raw[0], raw[1], raw[2])
        await topology.declare_pool(raw[1], self.pool, self.queues, self.settings.queue_options)
        await self.pool_control.declare(raw[1])
        self.log.info("connected", url=str(connection), queues=self.queues)
        assert self._consumer is not None
        async with anyio.create_task_group() as tg:
            async def _watch(closed: Any) -> None:
                await closed
                raise ConnectionError("the broker closed the connection or a channel")

            tg.start_soon(_watch, connection.closed())
            for channel in channels:
                tg.start_soon(_watch, channel.closed())
            # Before anything unconfirmed goes out: endings peers may have reported are handed over.
            self._check_lease()
            tg.start_soon(self._outbox.publish_forever, session.publish)
            # A consumer of the cancel stream or the monitor dropped by the broker ends the session.
            tg.start_soon(raise_on_server_cancel, session.aux, "the cancel stream or the monitor")
            tg.start_soon(self.output.ship_forever, connection)
            await tg.start(self._cancels.follow, session.aux, session.publish)
            await follow_own_reports(session.aux, self.name, self._on_reported_lost)
            await tg.start(self.pool_control.follow, session.aux, session.publish)
            self._session = session
            self.connected = True
            self.metrics.connected.set(1)
            tg.start_soon(self._monitor.run, session.aux, self.settings.heartbeat_seconds,
                          session.publish)
            tg.start_soon(self.pool_control.maintain, raw[3], session.publish)
            if self._started_event_id is None:
                self._started_event_id = self._emit_worker(EventType.WORKER_STARTED)
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._consumer.run, session.runs, list(self._queue_of))
            self.ready.set()

    async def _redeclare_queue(self, channel: aiormq.abc.AbstractChannel, queue: str) -> None:
        session = self._session
        if session is not None:
            await topology.declare_work_queue(
                session.publish, self.pool, self._queue_of[queue], self.settings.queue_options
            )

    def _on_outbox_pressure(self, pressure: bool) -> None:
        if self._consumer is None:
            return
        if pressure:
            self._consumer.pause("outbox")
        else:
            self._consumer.resume("outbox")

    # -- one delivery ------------------------------------------------------------

    async def _handle_delivery(self, delivery: Delivery) -> None:
        try:
            await self._take(delivery)
        except Exception:
            self.log.exception("unexpected error while handling a run message; giving it back",
                               delivery_count=delivery.delivery_count)
            if not delivery.settled:
                await delivery.settle(requeue=True, failed=True)
            delivery.release_slot()

    async def _take(self, delivery: Delivery) -> None:
        queue = self._queue_of.get(delivery.queue, delivery.queue)
        if self._stopping:
            await delivery.settle(requeue=True)
            return
        try:
            run = parse_signed_run(delivery.body, delivery.headers, signer=self._signer,
                                   pool=self.pool, max_bytes=self.settings.max_message_bytes)
        except InvalidMessage as exc:
            await self._reject(delivery, queue, exc)
            return

        await self._after_previous_attempt(run)
        if await self._is_duplicate(run, delivery):
            return
        cancel = self._registry.get(run.id)
        if cancel is not None:
            self._emit_dropped(run, queue, cancel)
            await delivery.settle()
            return
        due = run.scheduled_start_time
        if due is not None and due.timestamp() - time.time() > self.settings.prefetch_seconds:
            await self._park(delivery, run, queue)
            return
        try:
            configuration = self._configure(run, queue)
        except InvalidMessage as exc:
            await self._reject(delivery, queue, exc, run=run)
            return

        lease = await self.pool_control.admit(run, queue, delivery)
        if not isinstance(lease, Lease):
            if isinstance(lease, Waiting):
                self._emit_waiting(run, queue, delivery, lease.target)
            else:
                await delivery.settle()  # its channel is gone: the broker delivers it again
            return
        active = ActiveRun(
            run=run,
            delivery=delivery,
            queue=queue,
            configuration=configuration,
            log=self.log.bind(run_id=str(run.id), queue=queue),
            related=_related(run, self.pool, queue),
            policy=RunPolicy.from_configuration(configuration),
        )
        self._active[run.id] = active
        try:
            await self._hold_and_run(active)
        finally:
            if self._active.get(run.id) is active:  # a retried run has left already
                del self._active[run.id]
            delivery.release_slot()
            self._notify_runs_changed()
            await self.pool_control.release(lease)

    def _emit_waiting(self, run: RunMessage, queue: str, delivery: Delivery, target: str) -> None:
        """The run left this worker to wait for a slot of `target` (see mq_worker.slots)."""
        self.log.info("run waits for a slot", run_id=str(run.id), waiting_for=target)
        due = run.scheduled_start_time.timestamp() if run.scheduled_start_time else time.time()
        data = {
            **self._run_data(run, queue, _related(run, self.pool, queue), None),
            "redelivered": delivery.redelivered,
            "delivery_count": delivery.delivery_count,
            "scheduled_start_time": run.scheduled_start_time,
            "late_by_seconds": round(max(0.0, time.time() - due), 6),
            "waiting_for": target,
        }
        self._outbox.put(build_event(EventType.RUN_PENDING, source=self.source,
                                     subject=str(run.id), data=data))

    async def _is_duplicate(self, run: RunMessage, delivery: Delivery) -> bool:
        active = self._active.get(run.id)
        if active is not None:
            if delivery.redelivered:
                active.log.info("redelivery of a run this worker holds; acknowledged",
                                state=active.state)
                await delivery.settle()
            else:
                await self._dead_letter(
                    delivery, f"duplicate: run {run.id} is already in flight on this worker"
                )
            return True
        if delivery.redelivered and run.id in self._finished:
            self.log.info("redelivery of a run that already ended here; acknowledged",
                          run_id=str(run.id), outcome=self._finished[run.id])
            await delivery.settle()
            return True
        return False

    def _configure(self, run: RunMessage, queue: str) -> BaseJobConfiguration:
        configuration = self.job_configuration.from_template_and_values(
            self.template, run.merged_job_variables()
        )
        context = self._contexts.get(queue)
        if context is None:  # the environment is the worker's: read once, not per run
            context = self._contexts[queue] = RunContext(
                pool=self.pool, queue=queue, worker=self.name, base_env=self.base_environment()
            )
        configuration.prepare_for_run(run, context)
        self.check_configuration(configuration)
        return configuration

    async def _hold_and_run(self, active: ActiveRun) -> None:
        run, delivery = active.run, active.delivery
        now = time.time()
        due = run.scheduled_start_time.timestamp() if run.scheduled_start_time else now
        self.metrics.pending.labels(self.pool, active.queue).inc()
        self._emit_run(
            active,
            EventType.RUN_PENDING,
            redelivered=delivery.redelivered,
            delivery_count=delivery.delivery_count,
            scheduled_start_time=run.scheduled_start_time,
            late_by_seconds=round(max(0.0, now - due), 6),
            job_variables=masked_job_variables({**self.template.defaults,
                                                **run.merged_job_variables()}),
        )
        if due > now:
            active.log.info("holding run until its start time", in_seconds=round(due - now, 3))
            delivery.hold()
            await _wait_any((active.wake, delivery.lost), timeout=due - now)
        if (delivery.lost.is_set() or delivery.channel.is_closed) and not delivery.settled:
            # Checked just before exec: the broker has taken the message back and
            # delivers it again, so starting it here could start it twice.
            active.log.warning("connection lost before the run started; the broker redelivers it")
            return
        if active.cancel is not None:
            self._finish(active, EventType.RUN_CANCELLED, reason=active.cancel.reason)
            await delivery.settle()
            return
        if self._stopping:
            active.log.info("run given back: the worker is stopping")
            await delivery.settle(requeue=True)
            return
        await self._start_and_watch(active, due)

    async def _start_and_watch(self, active: ActiveRun, due: float) -> None:
        active.state = "starting"
        result: list[WorkerResult] = []

        async def _run(*, task_status: anyio.abc.TaskStatus[str]) -> None:
            result.append(await self.run(active.run, active.configuration, task_status))
            active.timeout_timer.cancel()

        try:
            async with anyio.create_task_group() as tg:
                try:
                    active.infrastructure_pid = await tg.start(_run)
                except Exception as exc:
                    if is_transient_spawn_error(exc):
                        await self._give_back_for_now(active, exc)
                        return
                    if not await self._retry_failed_attempt(active, None, str(exc)):
                        self._start_failed(active, exc)
                    await active.delivery.settle()
                    return
                self._spawn_backoff.succeeded()
                await self._started(active, due)
                if active.policy.timeout_seconds is not None:
                    tg.start_soon(self._time_out, active, active.policy.timeout_seconds)
                if active.fenced:
                    tg.start_soon(self._kill, active, FORCED_GRACE_SECONDS)
                elif active.cancel is not None:
                    tg.start_soon(self._kill, active, None)
        except Exception as exc:
            active.log.exception("error while watching the run")
            self._finish(active, EventType.RUN_CRASHED, reason="monitoring-failed",
                         message=f"error while watching the run: {exc}",
                         infrastructure_pid=active.infrastructure_pid)
            return
        if not await self._retry_failed_attempt(active, result[0] if result else None):
            self._ended(active, result[0] if result else None)

    async def _give_back_for_now(self, active: ActiveRun, exc: Exception) -> None:
        """Resources ran out at spawn: not the run's fault. Give it back, pause intake."""
        delay = self._spawn_backoff.failed()
        active.log.warning("run given back: resources exhausted at spawn", error=str(exc),
                           intake_paused_for=delay)
        await active.delivery.settle(requeue=True)
        if self._consumer is not None and self._tg is not None:
            self._consumer.pause(_SPAWN_PAUSE)
            self._tg.start_soon(self._resume_intake_after, delay)

    async def _resume_intake_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        if self._consumer is not None:
            self._consumer.resume(_SPAWN_PAUSE)

    def _start_failed(self, active: ActiveRun, exc: Exception) -> None:
        message = f"the run could not be started: {exc}"
        active.log.error("run failed to start", error=str(exc))
        self.metrics.crashed.labels(self.pool, active.queue).inc()
        self._finish(active, EventType.RUN_CRASHED, reason="submission-failed", message=message,
                     status_code=None)

    async def _started(self, active: ActiveRun, due: float) -> None:
        active.state = "running"
        active.started_at = time.time()
        await active.delivery.ack_started()
        published = active.delivery.properties.timestamp
        since = published.timestamp() if isinstance(published, datetime) else None
        if since is not None:
            self.metrics.start_latency.labels(self.pool, active.queue).observe(
                max(0.0, active.started_at - max(since, due)))
        self.metrics.started.labels(self.pool, active.queue).inc()
        self._emit_run(
            active,
            EventType.RUN_SUBMITTED,
            infrastructure_pid=active.infrastructure_pid,
            late_by_seconds=round(max(0.0, active.started_at - due), 6),
            labels=active.configuration.labels,
        )
        active.log.info("run started", infrastructure_pid=active.infrastructure_pid)

    def _ended(self, active: ActiveRun, result: WorkerResult | None) -> None:
        code = result.status_code if result else None
        duration = time.time() - active.started_at if active.started_at else None
        if duration is not None:
            self.metrics.duration.labels(self.pool, active.queue).observe(duration)
        common = {
            "infrastructure_pid": active.infrastructure_pid,
        }
        if active.cancel is not None and active.killed:
            self._finish(active, EventType.RUN_CANCELLED, reason=active.cancel.reason,
                         status_code=code, **common)
        elif active.timed_out and active.killed:
            self._finish(active, EventType.RUN_CRASHED, status_code=code,
                         reason=CrashReason.TIMEOUT, message=_timeout_message(active, code),
                         **common)
        elif code == 0:
            self._finish(active, EventType.RUN_COMPLETED, status_code=0,
                         duration_seconds=round(duration or 0.0, 6), **common)
        else:
            message = (
                f"the process was killed by signal {-code}" if code is not None and code < 0
                else f"the process exited with status code {code}"
            )
            self._finish(active, EventType.RUN_CRASHED, status_code=code, reason="exit-code",
                         message=message, **common)

    # -- run policies: timeouts and retries -----------------------------------------

    async def _time_out(self, active: ActiveRun, seconds: float) -> None:
        """Stop a run still running `seconds` after its start, as a cancel would."""
        started = active.started_at or time.time()
        with active.timeout_timer:
            await anyio.sleep(max(0.0, started + seconds - time.time()))
        if active.timeout_timer.cancel_called or active.terminal or active.cancel is not None:
            return
        active.timed_out = True
        active.log.warning("run exceeded its timeout; stopping it", timeout_seconds=seconds)
        self.metrics.timeouts.labels(self.pool, active.queue).inc()
        await self._kill(active, None)

    async def _retry_failed_attempt(
        self, active: ActiveRun, result: WorkerResult | None, start_error: str | None = None
    ) -> bool:
        """Park the next attempt of a failed one when its policy asks for it.

        True once the next attempt is confirmed in the delay ladder and `run.retrying`
        is published: the run then has no terminal event from this attempt.
        """
        code = result.status_code if result else None
        reason = failure_reason(code, started=start_error is None,
                                cancelled=active.cancel is not None,
                                timed_out=active.timed_out and active.killed)
        attempt = active.run.attempt
        if reason is None or active.terminal or not active.policy.should_retry(reason, attempt):
            return False  # (terminal: a stop that failed was reported as kill-failed)
        delay = active.policy.retry_delay(attempt)
        # Still in flight while the next attempt is parked (a stopping worker waits for
        # it); that attempt, should it come back here first, waits for the end of this.
        active.state = "retrying"
        try:
            scheduled = await self._park_next_attempt(active, reason, code, start_error, delay)
        finally:
            if self._active.get(active.id) is active:
                del self._active[active.id]
                self._notify_runs_changed()
            active.retry_settled.set()
        cancel = self._registry.get(active.id)
        if scheduled and cancel is not None:  # it came while the next attempt was parked
            self._on_cancel(cancel)
        return scheduled

    async def _after_previous_attempt(self, run: RunMessage) -> None:
        """Let the attempt before `run`, if this worker is still parking it, finish that."""
        previous = self._active.get(run.id)
        if previous is not None and previous.state == "retrying" \
                and run.attempt > previous.run.attempt:
            with anyio.move_on_after(_RETRY_SESSION_WAIT_SECONDS + 30):
                await previous.retry_settled.wait()

    async def _park_next_attempt(
        self, active: ActiveRun, reason: CrashReason, code: int | None,
        start_error: str | None, delay: float,
    ) -> bool:
        attempt = active.run.attempt
        try:
            with anyio.move_on_after(_RETRY_SESSION_WAIT_SECONDS):
                # Rare (a reconnection at the end of an attempt): polling keeps the
                # session code free of a hook for it.
                while self._session is None:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            session = self._session
            if session is None:
                raise ConnectionError("not connected to the broker")
            async with session.ladder_lock:
                if not session.ladder_declared:
                    await topology.declare_delay_ladder(session.publish)
                    session.ladder_declared = True
            # The wait counts from here: declaring the ladder (the first time) does not eat
            # into it, and the announced start time is one the next attempt can keep.
            parking_began = time.time()
            start_at = datetime.fromtimestamp(parking_began + delay, UTC)
            parked = await park_next_attempt(
                session.publish, body=active.delivery.body, properties=active.delivery.properties,
                signer=self._signer,
                pool=self.pool,
                target_routing_key=topology.scheduled_routing_key(self.pool, active.queue),
                attempt=attempt + 1, start_at=start_at,
                prefetch_seconds=self.settings.prefetch_seconds,
            )
        except (*_SESSION_ERRORS, BrokerError, ValueError) as exc:
            active.log.error("the next attempt could not be scheduled; the run ends here",
                             error=f"{type(exc).__name__}: {exc}")
            return False
        message = failure_message(reason, code, timeout_seconds=active.policy.timeout_seconds,
                                  error=start_error)
        self.metrics.retries.labels(self.pool, active.queue).inc()
        self._emit_run(active, EventType.RUN_RETRYING, status_code=code, message=message,
                       reason=reason, infrastructure_pid=active.infrastructure_pid,
                       next_attempt=attempt + 1, next_start_time=start_at,
                       delay_seconds=round(delay, 6))
        active.log.warning("attempt failed; the next one is parked until its start time",
                           attempt=attempt, reason=str(reason), status_code=code,
                           next_start_time=start_at.isoformat(), parked_seconds=parked)
        waiting_data = self._run_data(active.run, active.queue, active.related,
                                      active.last_event_id)
        waiting_data["attempt"] = attempt + 1
        self._retry_waits.add(WaitingRetry(active.id, active.queue, waiting_data,
                                           back_at=parking_began + parked))
        return True

    async def _cancel_waiting_retry(self, waiting: WaitingRetry, record: CancelRecord) -> None:
        """End at once a run cancelled while its next attempt waits in the ladder."""
        session = self._session
        if session is None or not waiting.reportable():
            return  # the worker that takes the parked attempt reports the cancel
        try:
            await publish_cancel_reported(
                session.publish, run_id=waiting.run_id, reason=record.reason, pool=self.pool,
                worker=self.name, signer=self._signer,
            )
        except (*_SESSION_ERRORS, BrokerError) as exc:
            self.log.warning("could not mark the cancel as reported; the worker that takes "
                             "the parked attempt reports it", run_id=str(waiting.run_id),
                             error=f"{type(exc).__name__}: {exc}")
            return
        self._outbox.put(build_event(EventType.RUN_CANCELLED, source=self.source,
                                     subject=str(waiting.run_id),
                                     data={**waiting.event_data, "reason": record.reason}))
        self.metrics.cancelled.labels(self.pool, waiting.queue).inc()
        self._remember(waiting.run_id, EventType.RUN_CANCELLED)
        self.log.info("run cancelled while waiting for its next attempt",
                      run_id=str(waiting.run_id), attempt=waiting.event_data["attempt"])

    # -- cancels -----------------------------------------------------------------

    def _on_cancel(self, record: CancelRecord) -> None:
        active = self._active.get(record.run_id)
        if active is not None:
            self._request_cancel(active, record)
        elif (waiting := self._retry_waits.pop(record.run_id)) is not None and self._tg:
            self._tg.start_soon(self._cancel_waiting_retry, waiting, record)

    def _request_cancel(
        self, active: ActiveRun, record: CancelRecord, grace: float | None = None
    ) -> None:
        if active.terminal or active.cancel is not None:
            return
        active.cancel = record
        active.log.info("cancel received", state=active.state, reason=record.reason)
        if active.state == "held":
            active.wake.set()
        elif active.state == "running" and self._tg is not None:
            self._tg.start_soon(self._kill, active, grace)
        # "starting": the run is killed as soon as it has started.

    async def _kill(self, active: ActiveRun, grace: float | None) -> None:
        if active.kill_started:  # a cancel during the start's acknowledgement, or a fence
            if grace is not None and active.infrastructure_pid is not None:
                self.hurry_infrastructure(active.infrastructure_pid, grace)
            return
        active.kill_started = True
        grace_seconds = grace if grace is not None else active_grace(active)
        if self._force.is_set():
            grace_seconds = min(grace_seconds, FORCED_GRACE_SECONDS)
        assert active.infrastructure_pid is not None
        try:
            active.killed = True
            await self.kill_infrastructure(
                active.infrastructure_pid, active.configuration, grace_seconds
            )
        except InfrastructureNotFound:
            active.killed = False
            active.log.info("run ended before it could be stopped")
        except InfrastructureNotAvailable as exc:
            active.log.error("cannot stop the run", error=str(exc))
            self._finish(active, EventType.RUN_CRASHED, reason="kill-failed",
                         message=f"cancel failed: {exc}",
                         infrastructure_pid=active.infrastructure_pid)
        except NotImplementedError:
            active.killed = False
            active.log.error(f"worker type {self.type!r} cannot stop runs; cancel not honoured")

    def _on_invalid_cancel(self, exc: InvalidMessage, live: bool) -> None:
        self.log.warning("invalid cancel message ignored", reason=exc.reason, live=live)
        if live:
            self.metrics.rejected.labels(self.pool, "").inc()
            self._emit_rejected(None, f"invalid cancel: {exc.reason}", exc.run_id, kind="cancel")

    # -- settling without running ----------------------------------------------------

    async def _reject(
        self, delivery: Delivery, queue: str, exc: InvalidMessage, run: RunMessage | None = None
    ) -> None:
        run_id = run.id if run else exc.run_id
        self.log.warning("run message rejected", reason=exc.reason,
                         run_id=str(run_id) if run_id else None, queue=queue)
        if await self._dead_letter(delivery, exc.reason):
            self.metrics.rejected.labels(self.pool, queue).inc()
            self._emit_rejected(queue, exc.reason, run_id, run=run)

    async def _dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Copy the message to mq_worker.dead with `reason`, then settle it.

        False if it was not copied: it is given back to its queue (or gone with its connection).
        """
        session = self._session
        if session is None or delivery.lost.is_set():
            await delivery.settle()  # frees its slot; the broker delivers it again
            return False
        channel = session.publish
        properties, dropped = fit_headers(
            delivery.properties,
            delivery.headers,
            {
                "x-mq-worker-reason": reason[:_MAX_REASON_CHARS],
                "x-mq-worker-worker": self.name,
                "x-mq-worker-queue": delivery.queue,
                "x-mq-worker-routing-key": delivery.routing_key,
                "x-mq-worker-dead-lettered-at": datetime.now(UTC).isoformat(),
            },
            body_size=len(delivery.body),
            frame_max=frame_max_of(channel),
        )
        if dropped:
            self.log.warning("dead letter too large for one frame: received headers left out",
                             dropped=len(dropped), queue=delivery.queue)

        async def publish() -> None:
            await channel.basic_publish(
                delivery.body, exchange="", routing_key=topology.DEAD_QUEUE,
                properties=properties, mandatory=True, timeout=CONFIRM_TIMEOUT,
            )

        try:
            await hand_off(publish, lambda: topology.declare_dead_queue(channel),
                           what="dead letter", log=self.log)
        except HandoffReturned:
            await delivery.settle(requeue=True, failed=True)
            return False
        await delivery.settle()
        return True

    async def _park(self, delivery: Delivery, run: RunMessage, queue: str) -> None:
        session = self._session
        if session is None or delivery.lost.is_set():
            # Gone with its connection: parking a copy now would let the broker's
            # redelivery park a second one.
            await delivery.settle()  # frees its slot; the broker delivers it again
            return
        assert run.scheduled_start_time is not None
        channel = session.publish

        async def declare_ladder(again: bool = True) -> None:
            async with session.ladder_lock:
                if again or not session.ladder_declared:
                    await topology.declare_delay_ladder(channel)
                    session.ladder_declared = True

        await declare_ladder(again=False)
        until_due = run.scheduled_start_time.timestamp() - time.time()
        seconds = park_seconds(until_due, self.settings.prefetch_seconds)

        async def publish() -> None:
            await park(
                channel,
                body=delivery.body,
                properties=delivery.properties,
                target_routing_key=topology.scheduled_routing_key(self.pool, queue),
                delay_seconds=seconds,
                timeout=CONFIRM_TIMEOUT,
            )

        try:
            await hand_off(publish, declare_ladder, what="parked run", log=self.log)
        except HandoffReturned:
            await delivery.settle(requeue=True, failed=True)
            return
        await delivery.settle()
        self.metrics.parked.labels(self.pool, queue).inc()
        self.log.info("run parked until due", run_id=str(run.id), queue=queue,
                      due=run.scheduled_start_time.isoformat(), parked_seconds=seconds)

    def _emit_dropped(self, run: RunMessage, queue: str, cancel: CancelRecord) -> None:
        """A run cancelled before it reached this worker: it never starts."""
        if run.id in self._finished:
            return
        if cancel.reported:
            self.log.info("run was cancelled while waiting for its next attempt; its "
                          "cancelled event is published already", run_id=str(run.id))
            return
        self.log.info("run was cancelled before it started", run_id=str(run.id))
        data = {
            **self._run_data(run, queue, _related(run, self.pool, queue), None),
            "reason": cancel.reason,
        }
        self._outbox.put(build_event(EventType.RUN_CANCELLED, source=self.source,
                                     subject=str(run.id), data=data,
                                     traceparent=run.traceparent))
        self.metrics.cancelled.labels(self.pool, queue).inc()
        self._remember(run.id, EventType.RUN_CANCELLED)

    # -- events --------------------------------------------------------------------

    def _run_data(
        self, run: RunMessage, queue: str, related: list[dict[str, Any]], follows: str | None
    ) -> dict[str, Any]:
        return {
            "run_id": str(run.id),
            "run_name": run.name,
            "pool": self.pool,
            "queue": queue,
            "worker": self.name,
            "related": related,
            "tags": run.tags,
            "follows": follows,
            "attempt": run.attempt,
        }

    def _emit_run(self, active: ActiveRun, event_type: EventType, **extra: Any) -> None:
        data = self._run_data(active.run, active.queue, active.related, active.last_event_id)
        data.update(extra)
        event = build_event(event_type, source=self.source, subject=str(active.id), data=data,
                            traceparent=active.run.traceparent)
        active.last_event_id = event.id
        self._outbox.put(event)

    def _finish(self, active: ActiveRun, event_type: EventType, **extra: Any) -> bool:
        """Publish the run's one terminal event; False if it already had one."""
        if active.terminal:
            return False
        self._check_lease()
        if active.fenced:
            active.terminal = True
            self._remember(active.id, EventType.RUN_CRASHED)
            self.metrics.crashed.labels(self.pool, active.queue).inc()
            self._end_fenced(active, extra.get("status_code"))
            return True
        active.terminal = True
        self._emit_run(active, event_type, **extra)
        self._ended_pids[str(active.id)] = active.infrastructure_pid
        while len(self._ended_pids) > _FINISHED_MEMORY:
            self._ended_pids.popitem(last=False)
        counter = {
            EventType.RUN_COMPLETED: self.metrics.completed,
            EventType.RUN_CANCELLED: self.metrics.cancelled,
            EventType.RUN_CRASHED: self.metrics.crashed,
        }.get(event_type)
        if counter is not None and extra.get("reason") != "submission-failed":
            counter.labels(self.pool, active.queue).inc()
        self._remember(active.id, event_type)
        active.log.info("run ended", outcome=event_type.rsplit(".", 1)[-1],
                        status_code=extra.get("status_code"))
        return True

    def _remember(self, run_id: UUID, outcome: str) -> None:
        self._finished[run_id] = outcome
        if len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _emit_rejected(
        self,
        queue: str | None,
        reason: str,
        run_id: UUID | None,
        *,
        run: RunMessage | None = None,
        kind: str = "run",
    ) -> None:
        data: dict[str, Any] = {
            "run_id": str(run_id) if run_id else None,
            "run_name": run.name if run else None,
            "pool": self.pool,
            "queue": queue or "",
            "worker": self.name,
            "related": _related(run, self.pool, queue) if run and queue else [],
            "tags": run.tags if run else [],
            "follows": None,
            "attempt": run.attempt if run else 1,
            "reason": reason,
            "message_kind": kind,
        }
        self._outbox.put(build_event(EventType.RUN_REJECTED, source=self.source,
                                     subject=str(run_id) if run_id else None, data=data))

    def _worker_data(self) -> dict[str, Any]:
        return {
            "worker": self.name,
            "pool": self.pool,
            "queues": self.queues,
            "type": self.type,
            "limit": self.settings.limit,
            "hostname": self.hostname,
            "pid": os.getpid(),
            "version": _VERSION,
            "heartbeat_seconds": self.settings.heartbeat_seconds,
            "follows": self._started_event_id,
            "paused": self.pool_control.paused_targets(),
        }

    def _emit_worker(self, event_type: EventType, **extra: Any) -> str:
        event = build_event(event_type, source=self.source, subject=self.name,
                            data={**self._worker_data(), **extra})
        self._outbox.put(event)
        return event.id

    def _heartbeat(self) -> None:
        if not self.connected:
            return
        runs = [
            {
                "id": str(a.id),
                "name": a.run.name,
                "queue": a.queue,
                "state": a.state,
                "infrastructure_pid": a.infrastructure_pid,
                "attempt": a.run.attempt,
            }
            for a in self._active.values()
        ]
        self._emit_worker(
            EventType.WORKER_HEARTBEAT,
            free_slots=self._limiter.available_tokens,
            in_flight=[r["id"] for r in runs],
            runs=runs,
            outbox_depth=len(self._outbox),
        )
        self._lease.emitted(
            self._outbox.published + len(self._outbox) - 1,
            [str(r["id"]) for r in runs if r["state"] in REPORTED_STATES],
            has_peers=self._has_peers(),
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            self._heartbeat()
            await anyio.sleep(self.settings.heartbeat_seconds)

    def _report_lost(self, peer: PeerRecord) -> None:
        """Called on the elected worker when a peer of the pool is lost."""
        last_seen = datetime.now(UTC).timestamp() - (time.monotonic() - peer.last_seen)
        lost_runs = [r for r in peer.runs if r.get("state") in (None, "starting", "running")]
        self.log.warning("worker lost", lost_worker=peer.name, runs=len(lost_runs))
        self._outbox.put(build_event(
            EventType.WORKER_LOST, source=self.source, subject=peer.name,
            data={
                "worker": peer.name,
                "pool": peer.pool,
                "last_seen": datetime.fromtimestamp(last_seen, UTC).isoformat(),
                "in_flight": [r["id"] for r in peer.runs],
                "reported_by": self.name,
            },
        ))
        for run in lost_runs:
            queue = run.get("queue") or ""
            self._outbox.put(build_event(
                EventType.RUN_CRASHED, source=self.source, subject=str(run["id"]),
                event_id=worker_lost_event_id(peer.name, str(run["id"]),
                                              run.get("infrastructure_pid")),
                data={
                    "run_id": str(run["id"]),
                    "run_name": run.get("name"),
                    "pool": peer.pool,
                    "queue": queue,
                    "worker": peer.name,
                    "related": [],
                    "tags": [],
                    "follows": None,
                    "attempt": run.get("attempt", 1),
                    "reason": CrashReason.WORKER_LOST,
                    "message": f"worker {peer.name} stopped sending heartbeats while the run "
                               "was running",
                    "infrastructure_pid": run.get("infrastructure_pid"),
                    "reported_by": self.name,
                },
            ))

    # -- self-fencing (see mq_worker.fencing) -----------------------------------------

    def _has_peers(self) -> bool:
        """Whether another worker of the pool could report this one lost.

        Only the elected reporter watches heartbeats, so it knows its peers; any other
        worker knows that the elected one (another worker) would report it.
        """
        return not self._monitor.elected or any(
            name != self.name and not peer.lost for name, peer in self._monitor.peers.items())

    async def _lease_loop(self) -> None:
        while True:
            self._check_lease()
            await anyio.sleep(min(1.0, self.settings.heartbeat_seconds / 4))

    def _check_lease(self) -> None:
        at_risk = self._lease.at_risk(self._outbox.published)
        if at_risk:
            silence = time.monotonic() - self._lease.silent_since
            self._fence(at_risk, f"no heartbeat of this worker confirmed for {silence:.1f} s "
                                 "(stalled or cut off)", since=self._lease.silent_since)

    def _on_reported_lost(self, run_ids: list[str]) -> None:
        self.log.warning("a peer reported this worker lost", runs=len(run_ids))
        for run_id in run_ids:
            self._reported_lost[run_id] = None
        while len(self._reported_lost) > _FINISHED_MEMORY:
            self._reported_lost.popitem(last=False)
        self._fence(self._lease.confirmed_runs & set(run_ids), "a peer reported this worker lost",
                    since=time.monotonic())

    def _fence(self, run_ids: Iterable[str], why: str, *, since: float) -> None:
        """Stop runs peers may have reported lost with this worker; they end as reported."""
        for run_id in run_ids:
            active = self._active.get(UUID(run_id))
            if active is None or active.terminal:
                self._hand_over_ending(run_id)
                continue
            if active.fenced:
                continue
            active.fenced = True
            active.fenced_since = since
            active.log.warning("peers may have reported this run crashed with its worker; "
                               "stopping it", why=why)
            if active.state == "running" and self._tg is not None:
                self._tg.start_soon(self._kill, active, FORCED_GRACE_SECONDS)
            # "starting": killed as soon as it has started (see _start_and_watch).

    def _hand_over_ending(self, run_id: str) -> None:
        """An ended run whose own terminal event is still unconfirmed ends as peers report it."""
        pending = self._outbox.pending_terminal(run_id)
        if pending is None:
            return
        reported = run_id in self._reported_lost
        pid = self._ended_pids.get(run_id)
        if pending.id == worker_lost_event_id(self.name, run_id, pid) and not reported:
            return  # already handed over
        replacement = worker_lost_ending(pending, worker=self.name, source=self.source,
                                         infrastructure_pid=pid)
        if self._outbox.replace_unconfirmed(run_id, replacement, drop=reported):
            self.log.warning("a run ended while this worker was cut off; peers may have "
                             "reported it lost, so it ends as they report it",
                             run_id=run_id, replaced=pending.type,
                             peer_report_received=reported)

    def _end_fenced(self, active: ActiveRun, status_code: Any) -> None:
        event = build_event(
            EventType.RUN_CRASHED, source=self.source, subject=str(active.id),
            event_id=worker_lost_event_id(self.name, str(active.id), active.infrastructure_pid),
            data={
                **self._run_data(active.run, active.queue, active.related, active.last_event_id),
                "status_code": status_code,
                "reason": "worker-lost",
                "message": f"worker {self.name} stopped the run: its heartbeats were not "
                           "confirmed long enough for peers to report it lost",
                "infrastructure_pid": active.infrastructure_pid,
                "reported_by": self.name,
            },
        )

        async def _publish_unless_reported() -> None:
            # A peer's report may still be on its way: wait until this worker's
            # heartbeats are confirmed again, and a little more.
            settle = min(2.0, self.settings.heartbeat_seconds)
            with anyio.move_on_after(self._lease.threshold + 2 * settle):
                while True:
                    if self._lease.silent_for < self.settings.heartbeat_seconds + settle:
                        break
                    await anyio.sleep(0.1)
                await anyio.sleep(settle)
            if str(active.id) in self._reported_lost:
                active.log.info("run ended; a peer's worker-lost report is its terminal event")
            elif self._disconnected_at > active.fenced_since:
                # The broker closed this worker's connection during the silence: that is
                # what hands the election to a peer, which then reports the run. Its
                # report reached no queue of this worker.
                active.log.info("run ended; a peer has reported it with this worker "
                                "(worker-lost) while this worker was cut off")
            else:
                self._outbox.put(event)
                active.log.info("run ended", outcome="crashed", reason="worker-lost")

        if self._tg is None:
            self._outbox.put(event)
        else:
            self._tg.start_soon(_publish_unless_reported)

    # -- status ------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """(healthy, reason) for the health endpoint."""
        if self._stopping:
            return False, "stopping"
        if not self.connected:
            return False, "not connected to the broker (reconnecting)"
        if self._outbox.under_pressure:
            return False, "outbox full: events cannot be published"
        consumer = self._consumer
        if consumer is None:
            return False, "not consuming"
        paused = consumer.paused
        if paused:
            return False, "not consuming: " + ", ".join(sorted(paused))
        return True, "consuming"

    @property
    def in_flight(self) -> list[UUID]:
        return list(self._active)

    @property
    def free_slots(self) -> int:
        return int(self._limiter.available_tokens)


def _timeout_message(active: ActiveRun, code: int | None) -> str:
    return failure_message(CrashReason.TIMEOUT, code, timeout_seconds=active.policy.timeout_seconds)


def active_grace(active: ActiveRun) -> float:
    return float(getattr(active.configuration, "grace_seconds", 30.0))


def _related(run: RunMessage | None, pool: str, queue: str | None) -> list[dict[str, Any]]:
    related: list[dict[str, Any]] = []
    if run is not None and run.flow is not None:
        related.append({"role": "flow", "id": run.flow.id, "name": run.flow.name})
    if run is not None and run.deployment is not None:
        related.append(
            {"role": "deployment", "id": run.deployment.id, "name": run.deployment.name}
        )
    related.append({"role": "work-pool", "id": None, "name": pool})
    if queue:
        related.append({"role": "work-queue", "id": None, "name": queue})
    if run is not None:
        related.extend({"role": "tag", "id": tag, "name": tag} for tag in run.tags)
    return related


async def _wait_any(events: Iterable[anyio.Event], timeout: float) -> None:
    """Return when any of `events` is set or `timeout` seconds have passed."""
    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as tg:
            for event in events:
                async def _wait(e: anyio.Event = event) -> None:
                    await e.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(_wait)


def _package_version() -> str:
    try:
        return package_version("mq-worker")
    except Exception:
        return "0+unknown"


_VERSION = _package_version()


def worker_class(worker_type: str) -> type[BaseWorker]:
    cls = BaseWorker.get_worker_class_from_type(worker_type)
    if cls is None:
        raise ConfigurationError(
            f"unknown worker type {worker_type!r}; available: "
            + ", ".join(BaseWorker.get_all_available_worker_types())
        )
    return cls


__all__ = ["ActiveRun", "BaseWorker", "WorkerResult", "worker_class"]
