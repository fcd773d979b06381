"""A failed attempt's next one: parked in the delay ladder when the run's policy asks,
and ended at once if the run is cancelled while it waits there."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc

from mq_worker import topology
from mq_worker.cancellation import CancelRecord
from mq_worker.errors import BrokerError
from mq_worker.events import CrashReason, EventType
from mq_worker.messages import RunMessage
from mq_worker.metrics import WorkerMetrics
from mq_worker.policies import failure_message, failure_reason
from mq_worker.retrying import (
    WaitingRetries,
    WaitingRetry,
    park_next_attempt,
    publish_cancel_reported,
)
from mq_worker.signing import Signer
from mq_worker.workers.link import SESSION_ERRORS, Link
from mq_worker.workers.reporter import Reporter
from mq_worker.workers.runs import ActiveRun, RunBook, RunState, WorkerResult

BROKER_ERRORS = (*SESSION_ERRORS, BrokerError)
# How long a retry waits for a connection to park its next attempt before giving up.
_SESSION_WAIT_SECONDS = 30.0


class NextAttempts:
    def __init__(self, *, book: RunBook, link: Link, reporter: Reporter, metrics: WorkerMetrics,
                 signer: Signer | None, pool: str, worker: str, prefetch_seconds: float,
                 spawn: anyio.abc.TaskGroup, log: Any) -> None:
        self._book = book
        self._link = link
        self._report = reporter
        self._metrics = metrics
        self._signer = signer
        self._pool = pool
        self._worker = worker
        self._prefetch_seconds = prefetch_seconds
        self._spawn = spawn
        self._log = log
        self._waiting = WaitingRetries()

    async def after_failure(
        self, active: ActiveRun, result: WorkerResult | None, start_error: str | None = None
    ) -> bool:
        """Park the next attempt of a failed one when its policy asks for it.

        True once the next attempt is confirmed in the delay ladder and `run.retrying`
        is published: the run then has no terminal event from this attempt.
        """
        code = result.status_code if result else None
        reason = self._retried_reason(active, code, start_error,
                                      cancelled=active.cancel is not None)
        if reason is None or active.terminal:
            return False  # (terminal: a stop that failed was reported as kill-failed)
        attempt = active.run.attempt
        delay = active.policy.retry_delay(attempt)
        # Still in flight while the next attempt is parked (a stopping worker waits for
        # it); that attempt, should it come back here first, waits for the end of this.
        active.state = RunState.RETRYING
        try:
            scheduled = await self._park_next(active, reason, code, start_error, delay)
        finally:
            self._book.leave(active)
            active.retry_settled.set()
        return scheduled

    def cancel_ends_it(self, active: ActiveRun, result: WorkerResult | None,
                       start_error: str | None = None) -> bool:
        """Whether the run's cancel, not the attempt's failure, ends the run: the attempt
        failed on its own (before the cancel's stop reached it, or while it was starting)
        and would have run again but for the cancel."""
        if active.cancel is None:
            return False
        code = result.status_code if result else None
        return self._retried_reason(active, code, start_error, cancelled=False) is not None

    @staticmethod
    def _retried_reason(active: ActiveRun, code: int | None, start_error: str | None, *,
                        cancelled: bool) -> CrashReason | None:
        """Why the failed attempt runs again; None if it did not fail or is not retried."""
        reason = failure_reason(code, started=start_error is None, cancelled=cancelled,
                                timed_out=active.timed_out and active.stopped_by_worker)
        if reason is None or not active.policy.should_retry(reason, active.run.attempt):
            return None
        return reason

    async def after_previous(self, run: RunMessage) -> None:
        """Let the attempt before `run`, if this worker is still parking it, finish that."""
        previous = self._book.active.get(run.id)
        if previous is not None and previous.state is RunState.RETRYING \
                and run.attempt > previous.run.attempt:
            with anyio.move_on_after(_SESSION_WAIT_SECONDS + 30):
                await previous.retry_settled.wait()

    async def _park_next(
        self, active: ActiveRun, reason: CrashReason, code: int | None,
        start_error: str | None, delay: float,
    ) -> bool:
        attempt = active.run.attempt
        try:
            session = await self._link.wait_connected(_SESSION_WAIT_SECONDS)
            if session is None:
                raise ConnectionError("not connected to the broker")
            await session.declare_delay_ladder()
            # The wait counts from here: declaring the ladder (the first time) does not eat
            # into it, and the announced start time is one the next attempt can keep.
            parking_began = time.time()
            start_at = datetime.fromtimestamp(parking_began + delay, UTC)
            parked = await park_next_attempt(
                session.publish, body=active.delivery.body, properties=active.delivery.properties,
                signer=self._signer,
                pool=self._pool,
                target_routing_key=topology.scheduled_routing_key(self._pool, active.queue),
                attempt=attempt + 1, start_at=start_at,
                prefetch_seconds=self._prefetch_seconds,
            )
        except (*BROKER_ERRORS, ValueError) as exc:
            active.log.error("the next attempt could not be scheduled; the run ends here",
                             error=f"{type(exc).__name__}: {exc}")
            return False
        message = failure_message(reason, code, timeout_seconds=active.policy.timeout_seconds,
                                  error=start_error)
        self._metrics.of(self._pool, active.queue).retries.inc()
        self._report.retrying(active, status_code=code, message=message, reason=reason,
                              next_start_time=start_at, delay_seconds=round(delay, 6))
        active.log.warning("attempt failed; the next one is parked until its start time",
                           attempt=attempt, reason=str(reason), status_code=code,
                           next_start_time=start_at.isoformat(), parked_seconds=parked)
        self._waiting.add(WaitingRetry(active.id, active.queue,
                                       self._report.next_attempt_fields(active),
                                       back_at=parking_began + parked))
        return True

    def cancel_waiting(self, record: CancelRecord) -> bool:
        """End a run whose next attempt waits in the ladder; False if none waits."""
        waiting = self._waiting.pop(record.run_id)
        if waiting is None:
            return False
        self._spawn.start_soon(self._cancel_waiting, waiting, record)
        return True

    async def _cancel_waiting(self, waiting: WaitingRetry, record: CancelRecord) -> None:
        session = self._link.current
        if session is None or not waiting.reportable():
            return  # the worker that takes the parked attempt reports the cancel
        try:
            await publish_cancel_reported(
                session.publish, run_id=waiting.run_id, reason=record.reason, pool=self._pool,
                worker=self._worker, signer=self._signer,
            )
        except BROKER_ERRORS as exc:
            self._log.warning("could not mark the cancel as reported; the worker that takes "
                              "the parked attempt reports it", run_id=str(waiting.run_id),
                              error=f"{type(exc).__name__}: {exc}")
            return
        self._report.cancelled_while_waiting(waiting.run_id, waiting.event_data, record.reason)
        self._metrics.of(self._pool, waiting.queue).cancelled.inc()
        self._book.remember(waiting.run_id, EventType.RUN_CANCELLED)
        self._log.info("run cancelled while waiting for its next attempt",
                       run_id=str(waiting.run_id), attempt=waiting.event_data["attempt"])
