"""A run this worker holds, and the states it goes through here.

    delivered -> (rejected | duplicate | cancelled | parked | given back)   settled, no slot kept
    delivered -> held -> starting -> running -> ended            (completed | crashed | cancelled)
                                             -> retrying          (its next attempt is parked)
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from uuid import UUID

import anyio

from mq_worker.cancellation import CancelRecord
from mq_worker.concurrency import Signal
from mq_worker.consumer import Delivery
from mq_worker.events import EventType
from mq_worker.job_configuration import BaseJobConfiguration
from mq_worker.messages import RunMessage
from mq_worker.policies import NO_POLICY, RunPolicy


class RunState(enum.StrEnum):
    """Where a run this worker holds is; heartbeats list it as the run's `state`."""

    HELD = "held"  # pending: waiting for its start time
    STARTING = "starting"  # its infrastructure is being started
    RUNNING = "running"  # started; the worker watches it
    RETRYING = "retrying"  # the attempt failed; its next attempt is being parked


class Stopping(enum.Enum):
    """Whether the worker stops the run (a cancel, a timeout, a fence)."""

    NOT_ASKED = enum.auto()
    STOPPING = enum.auto()  # the worker's stop is ending it (or failed: kill-failed)
    NOT_STOPPED = enum.auto()  # it had ended already, or the worker type cannot stop runs


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
    state: RunState = RunState.HELD
    infrastructure_pid: str | None = None
    started_at: float | None = None
    cancel: CancelRecord | None = None
    stopping: Stopping = Stopping.NOT_ASKED
    # Its worker may have been reported lost with it: it ends as `crashed` (worker-lost).
    fenced: bool = False
    fenced_since: float = 0.0
    # The type of its one terminal event, once published.
    outcome: EventType | None = None
    last_event_id: str | None = None
    policy: RunPolicy = NO_POLICY
    timed_out: bool = False
    # The limit whose slot it lost while its worker was cut off: it is stopped, or not
    # started.
    slot_lost: str | None = None
    # While a worker type's `run` hook sets it up: cancels the start if not yet reported.
    abandon_start: Callable[[], bool] | None = None
    # A redelivery of its message was acknowledged here as a duplicate: the broker no
    # longer has it, whatever becomes of its own delivery.
    redelivery_taken: bool = False
    # Only while a timeout is watched: cancelled when the run ends.
    timeout_timer: anyio.CancelScope | None = None
    # Made when first asked for: most runs never need them, and each costs a look-up of
    # the async backend.
    _wake: anyio.Event | None = field(default=None, repr=False)
    _retry_settled: anyio.Event | None = field(default=None, repr=False)

    @property
    def wake(self) -> anyio.Event:
        """Set to wake a run held until its start time (a cancel, the worker stopping)."""
        if self._wake is None:
            self._wake = anyio.Event()
        return self._wake

    @property
    def retry_settled(self) -> anyio.Event:
        """Set once the run's failed attempt has parked its next one (or failed to)."""
        if self._retry_settled is None:
            self._retry_settled = anyio.Event()
        return self._retry_settled

    @property
    def id(self) -> UUID:
        return self.run.id

    @property
    def terminal(self) -> bool:
        """Its terminal event is published: nothing else is reported for it."""
        return self.outcome is not None

    @property
    def stopped_by_worker(self) -> bool:
        return self.stopping is Stopping.STOPPING

    @property
    def grace_seconds(self) -> float:
        return float(getattr(self.configuration, "grace_seconds", 30.0))


class RunBook:
    """The runs a worker holds, and how the runs that ended here lately ended."""

    MEMORY = 50_000  # ended runs remembered

    def __init__(self) -> None:
        self.active: dict[UUID, ActiveRun] = {}
        self.finished: OrderedDict[UUID, str] = OrderedDict()
        # Of recently ended runs: the id a peer's worker-lost report would give them.
        self.ended_pids: OrderedDict[str, str | None] = OrderedDict()
        self.changed = Signal()  # a run left

    def leave(self, active: ActiveRun) -> None:
        """`active` is no longer held (a later attempt of the same run may be)."""
        if self.active.get(active.id) is active:
            del self.active[active.id]
        self.changed.set()

    def remember(self, run_id: UUID, outcome: str) -> None:
        self.finished[run_id] = outcome
        if len(self.finished) > self.MEMORY:
            self.finished.popitem(last=False)

    def remember_pid(self, active: ActiveRun) -> None:
        self.ended_pids[active.run.id_text] = active.infrastructure_pid
        while len(self.ended_pids) > self.MEMORY:
            self.ended_pids.popitem(last=False)

    async def wait_empty(self) -> None:
        while self.active:
            self.changed.clear()
            if self.active:
                await self.changed.wait()


def related(run: RunMessage | None, pool: str, queue: str | None) -> list[dict[str, Any]]:
    """The resources a run event names: flow, deployment, pool, queue, tags."""
    resources: list[dict[str, Any]] = []
    if run is not None and run.flow is not None:
        resources.append({"role": "flow", "id": run.flow.id, "name": run.flow.name})
    if run is not None and run.deployment is not None:
        resources.append(
            {"role": "deployment", "id": run.deployment.id, "name": run.deployment.name}
        )
    resources.append({"role": "work-pool", "id": None, "name": pool})
    if queue:
        resources.append({"role": "work-queue", "id": None, "name": queue})
    if run is not None:
        resources.extend({"role": "tag", "id": tag, "name": tag} for tag in run.tags)
    return resources
