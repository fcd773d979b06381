"""The life of one run on this worker, once admitted: held until due, started, watched,
timed out or stopped, and ended with its one terminal event (or its next attempt)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import anyio
import anyio.abc

from mq_worker.concurrency import wait_first
from mq_worker.consumer import RunConsumer
from mq_worker.errors import InfrastructureNotAvailable, InfrastructureNotFound
from mq_worker.events import CrashReason, EventType
from mq_worker.fencing import HeartbeatLease
from mq_worker.metrics import WorkerMetrics
from mq_worker.outbox import Outbox
from mq_worker.policies import failure_message
from mq_worker.redaction import masked_job_variables
from mq_worker.resources import SpawnBackoff, is_transient_spawn_error
from mq_worker.signing import Signer
from mq_worker.workers.attempts import NextAttempts
from mq_worker.workers.fenced import Fencing
from mq_worker.workers.hooks import WorkerType
from mq_worker.workers.link import Link
from mq_worker.workers.reporter import Reporter
from mq_worker.workers.runs import ActiveRun, RunBook, RunState, Stopping, WorkerResult
from mq_worker.workers.started import (
    RunInTask,
    RunStarter,
    StartAbandoned,
    StartedRun,
    starts_runs_itself,
)

# The longest grace a run still gets once the worker is told to stop at once.
FORCED_GRACE_SECONDS = 5.0
# A run over its shared limit is stopped this fast: see slots.CUT_OFF_SECONDS.
SLOT_LOST_GRACE_SECONDS = 0.5
_SPAWN_PAUSE = "resources exhausted at spawn"


@dataclass(frozen=True)
class RunSurroundings:
    """What a worker's runs share: built once per `serve()`."""

    worker_type: WorkerType
    book: RunBook
    reporter: Reporter
    metrics: WorkerMetrics
    link: Link
    lease: HeartbeatLease
    outbox: Outbox
    signer: Signer | None
    pool: str
    worker: str
    prefetch_seconds: float
    heartbeat_seconds: float
    template_defaults: dict[str, Any]
    consumer: RunConsumer
    force: anyio.Event  # stop at once: graces shorten
    spawn: anyio.abc.TaskGroup
    log: Any


class RunLife:
    """Holds, starts, watches and ends the runs admitted to this worker."""

    def __init__(self, around: RunSurroundings) -> None:
        self._around = around
        self._type = around.worker_type
        self._book = around.book
        self._report = around.reporter
        self._metrics = around.metrics
        self._pool = around.pool
        self._spawn = around.spawn
        self._spawn_backoff = SpawnBackoff()
        self._starts_runs_itself = starts_runs_itself(around.worker_type)
        # A key's mask depends on the key and its value alone: the template's defaults are
        # masked once, each run's own variables on their own (~35 µs -> ~10 µs a run).
        self._masked_defaults = masked_job_variables(around.template_defaults)
        self.stopping = False
        self.attempts = NextAttempts(
            book=around.book, link=around.link, reporter=around.reporter,
            metrics=around.metrics, signer=around.signer, pool=around.pool,
            worker=around.worker, prefetch_seconds=around.prefetch_seconds, spawn=around.spawn,
            log=around.log,
        )
        self.fencing = Fencing(
            book=around.book, lease=around.lease, outbox=around.outbox, reporter=around.reporter,
            link=around.link, worker=around.worker, heartbeat_seconds=around.heartbeat_seconds,
            stop_soon=lambda active: self.stop_soon(active, FORCED_GRACE_SECONDS),
            spawn=around.spawn, log=around.log,
        )

    # -- from pending to running -------------------------------------------------------

    async def hold_and_run(self, active: ActiveRun) -> None:
        run, delivery = active.run, active.delivery
        now = time.time()
        due = run.scheduled_start_time.timestamp() if run.scheduled_start_time else now
        self._metrics.of(self._pool, active.queue).pending.inc()
        if self._report.start_events:
            self._report.pending(
                active,
                late_by_seconds=round(max(0.0, now - due), 6),
                job_variables={**self._masked_defaults,
                               **masked_job_variables(run.merged_job_variables())},
            )
        if due > now:
            active.log.info("holding run until its start time", in_seconds=round(due - now, 3))
            delivery.hold()
            await wait_first((active.wake, delivery.lost), timeout=due - now)
        if (delivery.lost.is_set() or delivery.channel.is_closed) and not delivery.settled:
            # Checked just before exec: the broker has taken the message back and
            # delivers it again, so starting it here could start it twice.
            active.log.warning("connection lost before the run started; the broker redelivers it")
            return
        if active.cancel is not None:
            self.finish(active, EventType.RUN_CANCELLED, reason=active.cancel.reason)
            await delivery.settle()
            return
        if self.stopping:
            active.log.info("run given back: the worker is stopping")
            await delivery.settle(requeue=True)
            return
        if active.slot_lost is not None:
            await self._not_started_without_slot(active)
            return
        await self._start_and_watch(active, due)

    async def _start_and_watch(self, active: ActiveRun, due: float) -> None:
        active.state = RunState.STARTING
        try:
            started = await self._start(active)
        except StartAbandoned:
            await self._not_started_without_slot(active)
            return
        except Exception as exc:
            if is_transient_spawn_error(exc):
                await self._give_back_for_now(active, exc)
                return
            if not await self._retry(active, None, str(exc)):
                self._start_failed(active, exc)
            await active.delivery.settle()
            return
        active.infrastructure_pid = started.infrastructure_pid
        self._spawn_backoff.succeeded()
        try:
            try:
                await self._started(active, due)
                self._watch_for_stops(active)
            finally:
                # The run is waited for even if reporting its start failed: its end is
                # what frees its process (and its place with the guardian).
                ending = await started.wait()
        except Exception as exc:
            active.log.exception("error while watching the run")
            self.finish(active, EventType.RUN_CRASHED, reason=CrashReason.MONITORING_FAILED,
                        message=f"error while watching the run: {exc}",
                        infrastructure_pid=active.infrastructure_pid)
            return
        finally:
            if active.timeout_timer is not None:
                active.timeout_timer.cancel()
        # A run stopped for its lost slot ends so; retrying it would not bring the slot back.
        if active.slot_lost is not None or not await self._retry(active, ending):
            self._ended(active, ending)

    async def _start(self, active: ActiveRun) -> StartedRun:
        """Start the run: in this task when the worker type can, else in a task of its own."""
        if self._starts_runs_itself:
            # Checked once (`starts_runs_itself`): a runtime Protocol check costs ~8 µs a run.
            return cast(RunStarter, self._type).start_run(active.run, active.configuration)

        def starting(task: RunInTask) -> None:
            active.abandon_start = task.abandon

        return await RunInTask.start(self._type, active.run, active.configuration, self._spawn,
                                     starting=starting)

    def _watch_for_stops(self, active: ActiveRun) -> None:
        """What may stop the started run: its timeout, a fence, a cancel during its start.

        They run in the worker's task group, so they end with the worker; the timeout's
        scope is cancelled when the run ends.
        """
        if active.policy.timeout_seconds is not None:
            active.timeout_timer = anyio.CancelScope()
            self._spawn.start_soon(self._time_out, active, active.policy.timeout_seconds,
                                   active.timeout_timer)
        if active.fenced:
            self.stop_soon(active, FORCED_GRACE_SECONDS)
        elif active.cancel is not None:
            self.stop_soon(active, None)
        elif active.slot_lost is not None:  # lost as the start was being reported
            self.stop_soon(active, SLOT_LOST_GRACE_SECONDS)

    async def _give_back_for_now(self, active: ActiveRun, exc: Exception) -> None:
        """Resources ran out at spawn: not the run's fault. Give it back, pause intake."""
        delay = self._spawn_backoff.failed()
        active.log.warning("run given back: resources exhausted at spawn", error=str(exc),
                           intake_paused_for=delay)
        await active.delivery.settle(requeue=True)
        self._around.consumer.pause(_SPAWN_PAUSE)
        self._spawn.start_soon(self._resume_intake_after, delay)

    async def _resume_intake_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        self._around.consumer.resume(_SPAWN_PAUSE)

    async def _not_started_without_slot(self, active: ActiveRun) -> None:
        """Its slot went back to the broker with its connection before its process started;
        so did its message, unless a redelivery was taken here as a duplicate."""
        if active.delivery.lost.is_set() and not active.redelivery_taken:
            active.log.warning("connection lost before the run started; the broker "
                               "redelivers it", slot_lost=active.slot_lost)
            return
        self.finish(active, EventType.RUN_CRASHED, reason=CrashReason.SLOT_LOST,
                    message=f"its slot of {active.slot_lost} went back to the broker while "
                            "its worker was cut off from it, before its process started; "
                            "not started, to keep the limit")
        await active.delivery.settle()

    def _start_failed(self, active: ActiveRun, exc: Exception) -> None:
        active.log.error("run failed to start", error=str(exc))
        if active.cancel is not None and self.attempts.cancel_ends_it(active, None, str(exc)):
            # Cancelled while starting: not retried, so the cancel is what ends the run.
            self.finish(active, EventType.RUN_CANCELLED, reason=active.cancel.reason,
                        message=f"cancelled while starting; the start failed: {exc}")
            return
        self._metrics.of(self._pool, active.queue).crashed.inc()
        self.finish(active, EventType.RUN_CRASHED, reason=CrashReason.SUBMISSION_FAILED,
                    message=f"the run could not be started: {exc}", status_code=None)

    async def _started(self, active: ActiveRun, due: float) -> None:
        active.state = RunState.RUNNING
        active.started_at = time.time()
        # `submitted` first: subscribers wait for it. It leaves in this turn (Outbox.send_now).
        try:
            self._report.submitted(active,
                                   late_by_seconds=round(max(0.0, active.started_at - due), 6))
        finally:
            await active.delivery.ack_started()
            self._around.outbox.send_now()
        published = active.delivery.properties.timestamp
        since = published.timestamp() if isinstance(published, datetime) else None
        if since is not None:
            self._metrics.of(self._pool, active.queue).start_latency.observe(
                max(0.0, active.started_at - max(since, due)))
        self._metrics.of(self._pool, active.queue).started.inc()
        active.log.debug("run started", infrastructure_pid=active.infrastructure_pid)

    # -- ending --------------------------------------------------------------------

    async def _retry(self, active: ActiveRun, result: WorkerResult | None,
                     start_error: str | None = None) -> bool:
        """Whether the failed attempt's next one is parked: then this one has no ending."""
        scheduled = await self.attempts.after_failure(active, result, start_error)
        cancel = active.cancel
        if scheduled and cancel is not None:  # it came while the next attempt was parked
            self.attempts.cancel_waiting(cancel)
        return scheduled

    def _ended(self, active: ActiveRun, result: WorkerResult | None) -> None:
        code = result.status_code if result else None
        duration = time.time() - active.started_at if active.started_at else None
        if duration is not None:
            self._metrics.of(self._pool, active.queue).duration.observe(duration)
        pid = active.infrastructure_pid
        if active.cancel is not None and active.stopped_by_worker:
            self.finish(active, EventType.RUN_CANCELLED, reason=active.cancel.reason,
                        status_code=code, infrastructure_pid=pid)
        elif active.cancel is not None and self.attempts.cancel_ends_it(active, result):
            # It failed on its own before the cancel's stop reached it; had the cancel not
            # come it would run again, so the cancel is what ends the run.
            self.finish(active, EventType.RUN_CANCELLED, reason=active.cancel.reason,
                        status_code=code, infrastructure_pid=pid,
                        message="the attempt failed before the cancel could stop it: "
                                + failure_message(CrashReason.EXIT_CODE, code))
        elif active.timed_out and active.stopped_by_worker:
            message = failure_message(CrashReason.TIMEOUT, code,
                                      timeout_seconds=active.policy.timeout_seconds)
            self.finish(active, EventType.RUN_CRASHED, status_code=code,
                        reason=CrashReason.TIMEOUT, message=message, infrastructure_pid=pid)
        elif active.slot_lost is not None and active.stopped_by_worker:
            self.finish(active, EventType.RUN_CRASHED, status_code=code,
                        reason=CrashReason.SLOT_LOST,
                        message=f"its slot of {active.slot_lost} went back to the broker while "
                                "its worker was cut off from it, for another run to take; "
                                "stopped to keep the limit", infrastructure_pid=pid)
        elif code == 0:
            self.finish(active, EventType.RUN_COMPLETED, status_code=0,
                        duration_seconds=round(duration or 0.0, 6), infrastructure_pid=pid)
        else:
            message = (
                f"the process was killed by signal {-code}" if code is not None and code < 0
                else f"the process exited with status code {code}"
            )
            self.finish(active, EventType.RUN_CRASHED, status_code=code,
                        reason=CrashReason.EXIT_CODE, message=message, infrastructure_pid=pid)

    def finish(self, active: ActiveRun, event_type: EventType, **fields: Any) -> bool:
        """Publish the run's one terminal event, with `fields` of the event type's data
        function (see mq_worker.events); False if it already had one."""
        if active.terminal:
            return False
        self.fencing.check_lease()
        if active.fenced:
            active.outcome = EventType.RUN_CRASHED
            self._book.remember(active.id, EventType.RUN_CRASHED)
            self._metrics.of(self._pool, active.queue).crashed.inc()
            self.fencing.end(active, fields.get("status_code"))
            return True
        active.outcome = event_type
        self._report.ended(active, event_type, **fields)
        self._book.remember_pid(active)
        counted = self._metrics.of(self._pool, active.queue)
        counter = {
            EventType.RUN_COMPLETED: counted.completed,
            EventType.RUN_CANCELLED: counted.cancelled,
            EventType.RUN_CRASHED: counted.crashed,
        }.get(event_type)
        if counter is not None and fields.get("reason") != CrashReason.SUBMISSION_FAILED:
            counter.inc()
        self._book.remember(active.id, event_type)
        # A run's one record at the default level ("run started" is at DEBUG).
        active.log.info("run ended", outcome=event_type.rsplit(".", 1)[-1],
                        status_code=fields.get("status_code"),
                        infrastructure_pid=active.infrastructure_pid)
        return True

    # -- stopping a run: cancels, timeouts, fences -------------------------------------

    async def _time_out(self, active: ActiveRun, seconds: float,
                        timer: anyio.CancelScope) -> None:
        """Stop a run still running `seconds` after its start, as a cancel would."""
        started = active.started_at or time.time()
        with timer:
            await anyio.sleep(max(0.0, started + seconds - time.time()))
        if timer.cancel_called or active.terminal or active.cancel is not None:
            return
        active.timed_out = True
        active.log.warning("run exceeded its timeout; stopping it", timeout_seconds=seconds)
        self._metrics.of(self._pool, active.queue).timeouts.inc()
        await self._kill(active, None)

    def slot_lost(self, run_id: UUID, target: str) -> None:
        """A running run's shared-limit slot went to another run while this worker was cut
        off: stop it, so the limit holds (see mq_worker.slots)."""
        active = self._book.active.get(run_id)
        if active is None or active.terminal or active.slot_lost is not None:
            return
        active.slot_lost = target
        if active.state is RunState.RUNNING:
            self.stop_soon(active, SLOT_LOST_GRACE_SECONDS)
        elif active.state is RunState.STARTING and active.abandon_start is not None:
            active.abandon_start()  # (a start reported meanwhile: see _watch_for_stops)
        elif active.state is RunState.HELD:
            active.wake.set()  # held until its start time: not started (see hold_and_run)

    def stop_soon(self, active: ActiveRun, grace: float | None) -> None:
        self._spawn.start_soon(self._kill, active, grace)

    def hurry(self, active: ActiveRun) -> None:
        """Shorten the grace of a stop under way (the worker is told to stop at once)."""
        if active.infrastructure_pid is not None:
            self._type.hurry_infrastructure(active.infrastructure_pid, FORCED_GRACE_SECONDS)

    async def _kill(self, active: ActiveRun, grace: float | None) -> None:
        if active.stopping is not Stopping.NOT_ASKED:  # a cancel during the start's ack, or a fence
            if grace is not None and active.infrastructure_pid is not None:
                self._type.hurry_infrastructure(active.infrastructure_pid, grace)
            return
        active.stopping = Stopping.STOPPING
        grace_seconds = grace if grace is not None else active.grace_seconds
        if self._around.force.is_set():
            grace_seconds = min(grace_seconds, FORCED_GRACE_SECONDS)
        pid = active.infrastructure_pid
        if pid is None:  # only runs that have started are stopped
            active.stopping = Stopping.NOT_STOPPED
            return
        try:
            await self._type.kill_infrastructure(pid, active.configuration, grace_seconds)
        except InfrastructureNotFound:
            active.stopping = Stopping.NOT_STOPPED
            active.log.info("run ended before it could be stopped")
        except InfrastructureNotAvailable as exc:
            active.log.error("cannot stop the run", error=str(exc))
            self.finish(active, EventType.RUN_CRASHED, reason=CrashReason.KILL_FAILED,
                        message=f"cancel failed: {exc}", infrastructure_pid=pid)
        except NotImplementedError:
            active.stopping = Stopping.NOT_STOPPED
            active.log.error(f"worker type {self._type.type!r} cannot stop runs; "
                             "cancel not honoured")
