"""The run keeper: every run message this worker takes, from its delivery to its one
terminal event. It reads the message, asks triage for a verdict, settles it, and hands
the runs it admits to their life (see mq_worker.workers.lifecycle)."""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

import anyio

from mq_worker.cancellation import CancelRecord, CancelRegistry
from mq_worker.consumer import Delivery
from mq_worker.errors import InvalidMessage
from mq_worker.events import EventType, MessageKind
from mq_worker.job_configuration import BaseJobConfiguration
from mq_worker.messages import RunMessage
from mq_worker.policies import RunPolicy
from mq_worker.pool_control import PoolControl
from mq_worker.signing import parse_signed_run
from mq_worker.slot_requests import Lease
from mq_worker.slots import Waiting
from mq_worker.workers.configuring import Configurer
from mq_worker.workers.lifecycle import RunLife, RunSurroundings
from mq_worker.workers.runs import ActiveRun, RunState, related
from mq_worker.workers.settling import Settler
from mq_worker.workers.triage import (
    Cancelled,
    Duplicate,
    GiveBack,
    Park,
    Reject,
    Run,
    Triage,
    triage,
)


class RunKeeper:
    """Takes deliveries, settles those that do not run, keeps the runs that do."""

    def __init__(self, around: RunSurroundings, *, configurer: Configurer,
                 cancels: CancelRegistry, pool_control: PoolControl, queue_of: dict[str, str],
                 max_message_bytes: int) -> None:
        self._around = around
        self.book = around.book
        self._configurer = configurer
        self._cancels = cancels
        self._pool_control = pool_control
        self._queue_of = queue_of
        self._max_message_bytes = max_message_bytes
        self._log = around.log
        self.life = RunLife(around)
        self._settler = Settler(link=around.link, reporter=around.reporter,
                                metrics=around.metrics, pool=around.pool, worker=around.worker,
                                prefetch_seconds=around.prefetch_seconds, log=around.log)

    # -- what triage asks (see mq_worker.workers.triage) ----------------------------------

    @property
    def stopping(self) -> bool:
        return self.life.stopping

    def holds(self, run_id: UUID) -> bool:
        return run_id in self.book.active

    def ended_here(self, run_id: UUID) -> bool:
        return run_id in self.book.finished

    def cancel_of(self, run_id: UUID) -> CancelRecord | None:
        return self._cancels.get(run_id)

    # -- one delivery ------------------------------------------------------------------

    async def take(self, delivery: Delivery) -> None:
        """Handle one delivery until its run has ended (the consumer's handler)."""
        try:
            await self._take(delivery)
        except Exception:
            self._log.exception("unexpected error while handling a run message; giving it back",
                                delivery_count=delivery.delivery_count)
            if not delivery.settled:
                await delivery.settle(requeue=True, failed=True)
            delivery.release_slot()

    async def _take(self, delivery: Delivery) -> None:
        queue = self._queue_of.get(delivery.queue, delivery.queue)
        message = None if self.stopping else self._read(delivery)
        if isinstance(message, RunMessage):
            await self.life.attempts.after_previous(message)
        verdict = triage(message, queue=queue, redelivered=delivery.redelivered, known=self,
                         configure=self._configurer.configure, now=time.time(),
                         prefetch_seconds=self._around.prefetch_seconds)
        await self._settle(verdict, delivery, queue)

    def _read(self, delivery: Delivery) -> RunMessage | InvalidMessage:
        try:
            return parse_signed_run(delivery.body, delivery.headers, signer=self._around.signer,
                                    pool=self._around.pool, max_bytes=self._max_message_bytes)
        except InvalidMessage as exc:
            return exc

    async def _settle(self, verdict: Triage, delivery: Delivery, queue: str) -> None:
        """Settle a delivered message as triage decided: the one place for each verdict."""
        match verdict:
            case GiveBack():
                await delivery.settle(requeue=True)
            case Reject(error=error, run=run):
                await self._settler.reject(delivery, queue, error, run=run)
            case Duplicate(run=run, dead_letter=reason) if reason is not None:
                await self._settler.dead_letter(delivery, reason)
            case Duplicate(run=run):
                if (held := self.book.active.get(run.id)) is not None:
                    held.redelivery_taken = True
                self._log.info("redelivery of a run this worker holds or has ended; "
                               "acknowledged", run_id=str(run.id),
                               outcome=self.book.finished.get(run.id))
                await delivery.settle()
            case Cancelled(run=run, cancel=cancel):
                self._cancelled_before_start(run, queue, cancel)
                await delivery.settle()
            case Park(run=run, due=due):
                await self._settler.park(delivery, run, due, queue)
            case Run(run=run, configuration=configuration):
                await self._admit_and_run(delivery, queue, run, configuration)

    def _cancelled_before_start(self, run: RunMessage, queue: str, cancel: CancelRecord) -> None:
        """A run cancelled before it reached this worker: it never starts."""
        if run.id in self.book.finished:
            return
        if cancel.reported:
            self._log.info("run was cancelled while waiting for its next attempt; its "
                           "cancelled event is published already", run_id=str(run.id))
            return
        self._log.info("run was cancelled before it started", run_id=str(run.id))
        self._around.reporter.cancelled_before_start(run, queue, cancel.reason)
        self._around.metrics.of(self._around.pool, queue).cancelled.inc()
        self.book.remember(run.id, EventType.RUN_CANCELLED)

    async def _admit_and_run(self, delivery: Delivery, queue: str, run: RunMessage,
                             configuration: BaseJobConfiguration) -> None:
        lease = await self._pool_control.admit(run, queue, delivery)
        if not isinstance(lease, Lease):
            if isinstance(lease, Waiting):
                # The run left this worker to wait for a slot (see mq_worker.slots).
                self._log.info("run waits for a slot", run_id=str(run.id),
                               waiting_for=lease.target)
                self._around.reporter.waiting(run, queue, delivery, lease.target)
            else:
                await delivery.settle()  # its channel is gone: the broker delivers it again
            return
        active = ActiveRun(
            run=run,
            delivery=delivery,
            queue=queue,
            configuration=configuration,
            log=self._log.bind(run_id=run.id_text, queue=queue),
            related=related(run, self._around.pool, queue),
            policy=RunPolicy.from_configuration(configuration),
        )
        self.book.active[run.id] = active
        cancel = self.cancel_of(run.id)
        if cancel is not None:  # it arrived while the run took its slots (see slots)
            self._request_cancel(active, cancel)
        try:
            await self.life.hold_and_run(active)
        finally:
            self.book.leave(active)  # unless a retried run has left already
            delivery.release_slot()
            await self._pool_control.release(lease)

    # -- cancels -----------------------------------------------------------------------

    def on_cancel(self, record: CancelRecord) -> None:
        """A cancel arrived on the cancel stream (the registry remembers it)."""
        active = self.book.active.get(record.run_id)
        if active is not None:
            self._request_cancel(active, record)
        else:
            self.life.attempts.cancel_waiting(record)

    def on_invalid_cancel(self, exc: InvalidMessage, live: bool) -> None:
        self._log.warning("invalid cancel message ignored", reason=exc.reason, live=live)
        if live:
            self._around.metrics.rejected.labels(self._around.pool, "").inc()
            self._around.reporter.rejected(None, f"invalid cancel: {exc.reason}", exc.run_id,
                                           kind=MessageKind.CANCEL)

    def _request_cancel(self, active: ActiveRun, record: CancelRecord,
                        grace: float | None = None) -> None:
        if active.terminal or active.cancel is not None:
            return
        active.cancel = record
        active.log.info("cancel received", state=active.state, reason=record.reason)
        if active.state is RunState.HELD:
            active.wake.set()
        elif active.state is RunState.RUNNING:
            self.life.stop_soon(active, grace)
        # "starting": the run is killed as soon as it has started.

    # -- stopping the worker ----------------------------------------------------------

    def stop_taking(self) -> None:
        """From now on every delivery, and every run not started, is given back."""
        self.life.stopping = True

    async def drain(self, *, timeout: float | None, cancel_reason: Callable[[], str]) -> None:
        """Give back the runs not started, wait for the others (up to `timeout`, or until
        told to stop at once), then cancel those still running and wait for their end."""
        force = self._around.force
        for active in list(self.book.active.values()):
            if active.state is RunState.HELD:
                active.wake.set()
        running = [a for a in self.book.active.values() if a.state is not RunState.HELD]
        if running:
            self._log.info("waiting for running runs", count=len(running))
        with anyio.move_on_after(timeout if timeout is not None else float("inf")):
            async with anyio.create_task_group() as tg:
                async def _force() -> None:
                    await force.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(_force)
                await self.book.wait_empty()
                tg.cancel_scope.cancel()
        if not self.book.active:
            return
        reason = cancel_reason()
        self._log.warning("cancelling runs still running", count=len(self.book.active))
        for active in list(self.book.active.values()):
            self._request_cancel(active, CancelRecord(active.id, reason, time.time()))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._hurry_when_forced)
            await self.book.wait_empty()
            tg.cancel_scope.cancel()

    async def _hurry_when_forced(self) -> None:
        """A second signal shortens every grace, also of stops already under way."""
        await self._around.force.wait()
        for active in list(self.book.active.values()):
            self.life.hurry(active)
