"""A worker's side of work pool control: pauses and shared limits from the control stream."""

from __future__ import annotations

import contextlib
import random
import time
from collections import deque
from collections.abc import Callable

import aiormq.abc
import aiormq.exceptions
import anyio
import anyio.abc
import structlog
from prometheus_client import CollectorRegistry, Gauge

from mq_worker import topology
from mq_worker.consumer import Delivery, RunConsumer
from mq_worker.control import ControlFollower
from mq_worker.limits import ControlState, pool_target, queue_target, run_targets
from mq_worker.messages import RunMessage
from mq_worker.slot_requests import Lease
from mq_worker.slots import SlotGate, Waiting

# How often a worker looks at the limits it serves: for its metrics, and to wake runs
# waiting for slots that came back without a release (a holder that died or was cut off).
CHECK_SECONDS = 1.0
# How long such slots must have stayed free before they are handed to waiting runs:
# a holder cut off from the broker, its runs still running, takes them again first
# when it reconnects (see slots.SlotGate.reclaim), which it does within
# slots.CUT_OFF_SECONDS or not at all. (The limit does not rest on it: a run that takes
# such a slot holds it unused for a while first, see slots.SlotGate.admit.) A dead
# holder's slots are in use again after about this long plus that hold.
RETURNED_SLOT_GRACE_SECONDS = 1.0
# While slots seem free and runs wait, look again this often; a longer gap between two
# looks starts the grace again (what happened in between is unknown).
SETTLING_CHECK_SECONDS = 0.4
_LONGEST_GAP_SECONDS = 1.0
_NO_LIMITS = Lease(channel=None)

log = structlog.get_logger("mq_worker.pool_control")


class PoolControl:
    """Follows the control stream for one worker and applies pauses to its consumer."""

    def __init__(self, pool: str, queues: list[str],
                 consumer: Callable[[], RunConsumer | None],
                 on_slot_lost: Callable[[str, str], None] | None = None) -> None:
        self.pool = pool
        self.queues = list(queues)
        self.state = ControlState()
        self._consumer = consumer
        self._follower = ControlFollower(self.state, self._apply)
        self._paused_gauge: Gauge | None = None
        self.gate = SlotGate(self.state, on_slot_lost)
        # Per target, (when, free tokens) as seen by the recent checks.
        self._free_seen: dict[str, deque[tuple[float, int]]] = {}
        self._known_limits: set[str] = set()
        self._removed: set[str] = set()
        self._touched: set[str] = set()
        self._changed = anyio.Event()
        self._limit_gauges: tuple[Gauge, Gauge, Gauge] | None = None
        self._slots: aiormq.abc.AbstractChannel | None = None  # the session's, in `maintain`

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        self._paused_gauge = Gauge(
            "mq_worker_paused", "1 while an operator's pause stops intake of the target.",
            ["target"], registry=registry,
        )
        for target in (pool_target(self.pool), *(queue_target(self.pool, q) for q in self.queues)):
            self._paused_gauge.labels(target).set(0)
        self._limit_gauges = (
            Gauge("mq_worker_limit_slots", "Slots of a shared limit.", ["target"],
                  registry=registry),
            Gauge("mq_worker_limit_in_use", "Slots of a shared limit in use, on all workers.",
                  ["target"], registry=registry),
            Gauge("mq_worker_limit_waiting", "Runs waiting for a slot of a shared limit.",
                  ["target"], registry=registry),
        )

    # -- shared limits ------------------------------------------------------------

    async def admit(
        self, run: RunMessage, queue: str, delivery: Delivery
    ) -> Lease | Waiting | None:
        """Take the slots `run` needs (see slots); a lease to release when the run ends."""
        if not self.state.limits:
            return _NO_LIMITS
        targets = self.state.limited(run_targets(run, self.pool, queue))
        if not targets:
            return _NO_LIMITS
        self._touched.update(targets)
        return await self.gate.admit(targets, delivery, str(run.id))

    async def release(self, lease: Lease) -> None:
        if lease is not _NO_LIMITS:  # (even without tokens: a lease lost with a connection)
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self.gate.release(lease)

    async def maintain(
        self, slots: aiormq.abc.AbstractChannel, publish: aiormq.abc.AbstractChannel
    ) -> None:
        """For one session: take tokens on `slots`; send back the runs waiting for removed
        limits; keep the limit metrics current."""
        await slots.tx_select()  # tokens are given back in transactions (see slots)
        self.gate.bind(slots, publish)
        self._slots = slots
        try:
            await self.gate.reclaim()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.gate.end_session_if_tokens_lost)
                await self._check_forever()
        finally:
            self.gate.bind(None, None)

    async def _check_forever(self) -> None:
        while True:
            removed, self._removed = self._removed, set()
            for target in removed:
                await self.gate.wake_all(target)
            settling = await self._check_limits()
            # A spare kept here is given back soon after a run starts waiting for it,
            # and once it has stayed unused for a while.
            pause = SETTLING_CHECK_SECONDS if settling or self.gate.spares else CHECK_SECONDS
            # Jittered, so that workers rarely wake the same waiting runs at once.
            pause *= random.uniform(0.5, 1.5)
            with anyio.move_on_after(min(pause, self.gate.spares.idle_in())):
                await self._changed.wait()
            self._changed = anyio.Event()

    async def _check_limits(self) -> bool:
        """Refresh the metrics and wake the runs waiting for slots that have stayed free;
        True while some slots seem free with runs waiting."""
        mine = {pool_target(self.pool), *(queue_target(self.pool, q) for q in self.queues)}
        settling = False
        for target in sorted((mine | self._touched) & set(self.state.limits)):
            depths = await self.gate.depths(target)
            if depths is None:
                break
            free, queued = depths
            await self._give_back_spare(target, self.state.limits[target].limit, free, queued)
            if free and queued:
                settled = self._settled_free(target, free)
                if settled:
                    await self.gate.wake(target, at_most=settled)
                    self._free_seen.pop(target, None)
                settling = True
            else:
                self._free_seen.pop(target, None)
            if self._limit_gauges is not None:
                slots, in_use, waiting = self._limit_gauges
                limit = self.state.limits[target].limit
                slots.labels(target).set(limit)
                in_use.labels(target).set(max(0, limit - free))
                waiting.labels(target).set(queued)
        for target in set(self.gate.spares.targets()) - set(self.state.limits):
            await self._give_back_spare(target, None, 0, 0)
        for target in self._touched - set(self.state.limits):
            for gauge in self._limit_gauges or ():
                with contextlib.suppress(KeyError):
                    gauge.remove(target)
            self._touched.discard(target)
        return settling

    async def _give_back_spare(self, target: str, limit: int | None, free: int,
                               waiting: int) -> None:
        """A check saw `target` so: give back the spare this worker keeps of it if it may
        no longer be kept (see mq_worker.spares), and wake a waiting run for it."""
        slots = self._slots
        if slots is None or slots.is_closed:
            return
        with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            if await self.gate.spares.give_back_if_due(slots, target, limit, free,
                                                       waiting) and waiting:
                await self.gate.wake(target, at_most=1)

    def _settled_free(self, target: str, free: int) -> int:
        """How many of `target`'s tokens every check of the last grace period found free."""
        now = time.monotonic()
        seen = self._free_seen.setdefault(target, deque())
        if seen and now - seen[-1][0] > _LONGEST_GAP_SECONDS:
            seen.clear()
        seen.append((now, free))
        while len(seen) > 1 and seen[1][0] <= now - RETURNED_SLOT_GRACE_SECONDS:
            seen.popleft()
        if seen[0][0] > now - RETURNED_SLOT_GRACE_SECONDS:
            return 0
        return min(count for _, count in seen)

    async def declare(self, channel: aiormq.abc.AbstractChannel) -> None:
        await topology.declare_control_stream(channel)

    async def follow(
        self,
        channel: aiormq.abc.AbstractChannel,
        publisher: aiormq.abc.AbstractChannel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._follower.follow(channel, publisher, task_status=task_status)

    def paused_targets(self) -> list[str]:
        """The pauses that stop this worker's intake, as `pool:...` / `queue:.../...`."""
        mine = {pool_target(self.pool), *(queue_target(self.pool, q) for q in self.queues)}
        return sorted(self.state.paused & mine)

    def paused_queues(self) -> set[str]:
        return self.state.paused_queues(self.pool, self.queues)

    def _apply(self) -> None:
        limits = set(self.state.limits)
        self._removed |= self._known_limits - limits
        self._known_limits = limits
        self._changed.set()
        if self._paused_gauge is not None:
            paused = set(self.paused_targets())
            for target in (pool_target(self.pool),
                           *(queue_target(self.pool, q) for q in self.queues)):
                self._paused_gauge.labels(target).set(1 if target in paused else 0)
        consumer = self._consumer()
        if consumer is None:
            return
        paused = self.paused_queues()
        consumer.pause_queues({topology.work_queue_name(self.pool, q) for q in paused})
