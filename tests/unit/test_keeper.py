"""The run keeper driven without a broker: deliveries in, the worker type's runs and the
events out. The broker's side (settling, acknowledging) is a stand-in that records."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import orjson
import pytest
import structlog

from mq_worker.cancellation import CancelRecord, CancelRegistry
from mq_worker.errors import InfrastructureNotFound
from mq_worker.events import EventType
from mq_worker.fencing import HeartbeatLease
from mq_worker.job_configuration import BaseJobConfiguration, BaseJobTemplate
from mq_worker.messages import RunMessage
from mq_worker.metrics import WorkerMetrics
from mq_worker.outbox import Outbox
from mq_worker.policies import PolicyVariables
from mq_worker.pool_control import PoolControl
from mq_worker.workers.configuring import Configurer
from mq_worker.workers.keeper import RunKeeper
from mq_worker.workers.lifecycle import RunSurroundings
from mq_worker.workers.link import Link
from mq_worker.workers.reporter import Reporter, WorkerFacts
from mq_worker.workers.runs import RunBook, WorkerResult
from tests.helpers import wait_until
from tests.helpers.batch_channel import BatchChannel
from tests.helpers.workers import HeldSetUp

pytestmark = pytest.mark.anyio


@dataclass
class StandInDelivery:
    """What the keeper uses of a delivery; records how it was settled."""

    body: bytes
    redelivered: bool = False
    queue: str = "mq_worker.p.q"
    routing_key: str = "run.scheduled.p.q"
    headers: dict[str, Any] = field(default_factory=dict)
    delivery_count: int = 0
    settled: bool = False
    outcome: str | None = None  # acked-at-start, acked, requeued
    slot_held: bool = True
    lost: anyio.Event = field(default_factory=anyio.Event)
    on_ack: Callable[[], None] | None = None

    @property
    def properties(self) -> Any:
        return type("Properties", (), {"timestamp": None, "headers": {}})()

    @property
    def channel(self) -> Any:
        return type("Channel", (), {"is_closed": False})()

    def hold(self) -> None:
        pass

    async def ack_started(self) -> None:
        self.settled, self.outcome = True, "acked-at-start"
        if self.on_ack is not None:
            self.on_ack()

    async def settle(self, *, requeue: bool = False, failed: bool = False) -> None:
        self.settled, self.outcome = True, "requeued" if requeue else "acked"
        self.release_slot()

    def release_slot(self) -> None:
        self.slot_held = False


class StandInType:
    """A worker type whose runs end when told to, or when killed."""

    type = "stand-in"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.killed: list[str] = []
        self.ends: dict[str, anyio.Event] = {}
        self.exit_codes: dict[str, int] = {}

    async def run(self, run: RunMessage, configuration: BaseJobConfiguration,
                  task_status: anyio.abc.TaskStatus[str]) -> WorkerResult:
        pid = f"host:{len(self.started) + 1}"
        self.ends[pid] = anyio.Event()
        self.started.append(str(run.id))
        task_status.started(pid)
        await self.ends[pid].wait()
        return WorkerResult(pid, self.exit_codes.get(pid, 0))

    async def kill_infrastructure(self, infrastructure_pid: str,
                                  configuration: BaseJobConfiguration,
                                  grace_seconds: float = 30.0) -> int:
        self.killed.append(infrastructure_pid)
        self.exit_codes[infrastructure_pid] = -15
        self.ends[infrastructure_pid].set()
        return -15

    def hurry_infrastructure(self, infrastructure_pid: str, longest: float) -> None:
        pass


class StandInConsumer:
    def __init__(self) -> None:
        self.paused: set[str] = set()

    def pause(self, reason: str) -> None:
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)


@dataclass
class Kept:
    keeper: RunKeeper
    worker_type: StandInType
    outbox: Outbox
    cancels: CancelRegistry

    def events(self, run_id: str) -> list[str]:
        bodies = [orjson.loads(e.body) for e in self.outbox._events]
        return [b["type"].rsplit(".", 1)[-1] for b in bodies if b.get("subject") == run_id]

    def cancel(self, run_id: str) -> None:
        """Record a cancel of `run_id` and tell the keeper, as the cancel follower does."""
        record = CancelRecord(uuid.UUID(run_id), "no longer wanted", time.time())
        self.cancels.add(record)
        self.keeper.on_cancel(record)

    def terminal_data(self, run_id: str) -> dict[str, Any]:
        bodies = [orjson.loads(e.body) for e in self.outbox._events]
        data: dict[str, Any] = [b["data"] for b in bodies if b.get("subject") == run_id][-1]
        return data


class StandInStartedRun:
    def __init__(self, pid: str, end: anyio.Event, exit_codes: dict[str, int]) -> None:
        self.infrastructure_pid = pid
        self._end = end
        self._exit_codes = exit_codes

    async def wait(self) -> WorkerResult:
        await self._end.wait()
        return WorkerResult(self.infrastructure_pid,
                            self._exit_codes.get(self.infrastructure_pid, 0))


class StandInStarter(StandInType):
    """A worker type that starts its runs in the caller's task (like ProcessWorker)."""

    def start_run(self, run: RunMessage,
                  configuration: BaseJobConfiguration) -> StandInStartedRun:
        pid = f"host:{len(self.started) + 1}"
        self.ends[pid] = anyio.Event()
        self.started.append(str(run.id))
        return StandInStartedRun(pid, self.ends[pid], self.exit_codes)


class FailingAfterStart(StandInType):
    """A worker type whose `run` hook raises once it has reported the start."""

    async def run(self, run: RunMessage, configuration: BaseJobConfiguration,
                  task_status: anyio.abc.TaskStatus[str]) -> WorkerResult:
        self.started.append(str(run.id))
        task_status.started("host:1")
        await anyio.lowlevel.checkpoint()
        raise RuntimeError("lost track of it")


class RetriedConfiguration(PolicyVariables, BaseJobConfiguration):
    """A configuration with the run policy's variables, as ProcessWorker's has."""


RETRIED_TWICE = BaseJobTemplate.from_dict({"job_configuration": {"retries": 2},
                                           "variables": {}})


class EndsBeforeItsStop(StandInType):
    """A run that fails on its own just before the worker's stop reaches it: the worker
    type then finds it gone, as ProcessWorker does a process that has already exited."""

    async def kill_infrastructure(self, infrastructure_pid: str,
                                  configuration: BaseJobConfiguration,
                                  grace_seconds: float = 30.0) -> int:
        self.exit_codes[infrastructure_pid] = 3
        self.ends[infrastructure_pid].set()
        raise InfrastructureNotFound(f"run process {infrastructure_pid} has already exited")


class FailsToStartOnceCancelled(StandInType):
    """A run whose start is under way when the cancel comes, and then fails."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = anyio.Event()
        self.fail = anyio.Event()

    async def run(self, run: RunMessage, configuration: BaseJobConfiguration,
                  task_status: anyio.abc.TaskStatus[str]) -> WorkerResult:
        self.starting.set()
        await self.fail.wait()
        raise RuntimeError("no such program")


@asynccontextmanager
async def kept(worker_type: StandInType | None = None,
               template: BaseJobTemplate | None = None) -> AsyncIterator[Kept]:
    outbox = Outbox(1000)
    reporter = Reporter(WorkerFacts(worker="w", pool="p", queues=["q"], type="stand-in",
                                    limit=4, hostname="h", version="1", heartbeat_seconds=5.0,
                                    paused=lambda: []), outbox.put)
    worker_type = worker_type or StandInType()
    cancels = CancelRegistry(window_seconds=600)
    consumer: Any = StandInConsumer()
    async with anyio.create_task_group() as tg:
        around = RunSurroundings(
            worker_type=worker_type, book=RunBook(), reporter=reporter,
            metrics=WorkerMetrics("p", ["q"]), link=Link(), lease=HeartbeatLease(15.0),
            outbox=outbox, signer=None, pool="p", worker="w", prefetch_seconds=60.0,
            heartbeat_seconds=5.0, template_defaults={}, consumer=consumer,
            force=anyio.Event(), spawn=tg, log=structlog.get_logger("test"),
        )
        configurer = Configurer(
            worker_type="stand-in",
            configuration_type=BaseJobConfiguration if template is None else RetriedConfiguration,
            template=template or BaseJobTemplate.from_dict({"job_configuration": {},
                                                            "variables": {}}),
            pool="p", worker="w", base_environment=dict, check=lambda configuration: None,
        )
        keeper = RunKeeper(around, configurer=configurer, cancels=cancels,
                           pool_control=PoolControl("p", ["q"], lambda: None),
                           queue_of={"mq_worker.p.q": "q"}, max_message_bytes=1 << 20)
        yield Kept(keeper, worker_type, outbox, cancels)
        tg.cancel_scope.cancel()


def delivery(run_id: str, **fields: Any) -> StandInDelivery:
    body = orjson.dumps({"id": run_id, **fields.pop("run", {})})
    return StandInDelivery(body=body, **fields)


async def test_a_run_starts_is_acknowledged_at_start_and_completes() -> None:
    async with kept() as k:
        run_id = str(uuid.uuid4())
        first = delivery(run_id)
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.keeper.take, first)
            await wait_until(lambda: k.worker_type.started)
            assert first.outcome == "acked-at-start" and first.slot_held
            assert k.keeper.holds(uuid.UUID(run_id))
            k.worker_type.ends["host:1"].set()
        assert not first.slot_held and not k.keeper.holds(uuid.UUID(run_id))
        assert k.events(run_id) == ["pending", "submitted", "completed"]


async def test_a_run_of_a_type_that_starts_runs_itself_costs_no_task_of_its_own() -> None:
    async with kept(StandInStarter()) as k:
        run_id = str(uuid.uuid4())
        first = delivery(run_id)
        async with anyio.create_task_group() as tg:
            tasks_before = len(anyio.get_running_tasks())
            tg.start_soon(k.keeper.take, first)
            await wait_until(lambda: "submitted" in k.events(run_id))
            assert first.outcome == "acked-at-start"
            # The task that took the delivery watches the run: no task group, no other task.
            assert len(anyio.get_running_tasks()) == tasks_before + 1
            k.worker_type.ends["host:1"].set()
        assert not first.slot_held and not k.keeper.holds(uuid.UUID(run_id))
        assert k.events(run_id) == ["pending", "submitted", "completed"]


class RecordingChannel:
    """Confirms every publish after a checkpoint; records how many publishes had been
    confirmed when each one began (events of one outbox batch begin together)."""

    def __init__(self) -> None:
        self.began: list[tuple[str, int]] = []  # event type, publishes confirmed before it
        self.confirmed = 0

    async def basic_publish(self, body: bytes, *, routing_key: str, **_: Any) -> None:
        self.began.append((routing_key.rsplit(".", 1)[-1], self.confirmed))
        await anyio.lowlevel.checkpoint()
        self.confirmed += 1


async def test_pending_and_submitted_leave_in_one_batch() -> None:
    """No loop turn between the pending event, the spawn and the submitted event: the
    outbox sends both at once, and submitted never waits for pending's confirmation."""
    async with kept(StandInStarter()) as k:
        run_id = str(uuid.uuid4())
        channel = RecordingChannel()
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.outbox.publish_forever, channel)
            tg.start_soon(k.keeper.take, delivery(run_id))
            await wait_until(lambda: len(channel.began) >= 2)
            k.worker_type.ends["host:1"].set()
            await wait_until(lambda: len(channel.began) >= 3)
            tg.cancel_scope.cancel()
        assert channel.began == [("pending", 0), ("submitted", 0), ("completed", 2)]


async def test_submitted_is_queued_before_the_started_run_is_acknowledged() -> None:
    """Nothing but the spawn between `pending` and `submitted`: the acknowledgement (and
    the metrics) come after `submitted` is in the outbox, in the same loop turn."""
    async with kept(StandInStarter()) as k:
        run_id = str(uuid.uuid4())
        at_ack: list[list[str]] = []
        taken = delivery(run_id, on_ack=lambda: at_ack.append(k.events(run_id)))
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.keeper.take, taken)
            await wait_until(lambda: taken.outcome == "acked-at-start")
            k.worker_type.ends["host:1"].set()
        assert at_ack == [["pending", "submitted"]]
        assert k.events(run_id) == ["pending", "submitted", "completed"]


class WatchedStarter(StandInStarter):
    """Notes which events the connection holds when the run's watch begins: the first
    thing the run's task does after reporting the start, before it yields."""

    def __init__(self, channel: BatchChannel) -> None:
        super().__init__()
        self.channel = channel
        self.at_watch: list[list[str]] = []

    def start_run(self, run: RunMessage,
                  configuration: BaseJobConfiguration) -> StandInStartedRun:
        started = super().start_run(run, configuration)
        wait = started.wait

        async def noted() -> WorkerResult:
            self.at_watch.append(self.channel.queued_event_types())
            return await wait()

        started.wait = noted  # type: ignore[method-assign]
        return started


async def test_submitted_is_handed_to_the_connection_in_the_turn_its_process_started() -> None:
    """With nothing on the wire, `pending` and `submitted` are queued for the socket by the
    run's task itself, in order: not a loop turn later by the outbox's task."""
    channel = BatchChannel()
    async with kept(WatchedStarter(channel)) as k:
        assert isinstance(k.worker_type, WatchedStarter)
        run_id = str(uuid.uuid4())
        taken = delivery(run_id)
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.outbox.publish_forever, channel)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(k.keeper.take, taken)
            await wait_until(lambda: k.worker_type.at_watch)
            assert k.worker_type.at_watch == [["pending", "submitted"]]
            assert taken.outcome == "acked-at-start"
            channel.confirm_all()
            await wait_until(lambda: k.outbox.published == 2)
            k.worker_type.ends["host:1"].set()
            await wait_until(lambda: channel.queued_event_types()[-1:] == ["completed"])
            tg.cancel_scope.cancel()


class WrappingRun(StandInStarter):
    """A subclass that overrides only the run hook: its run hook is the one called."""

    wrapped = 0

    async def run(self, run: RunMessage, configuration: BaseJobConfiguration,
                  task_status: anyio.abc.TaskStatus[str]) -> WorkerResult:
        self.wrapped += 1
        return await super().run(run, configuration, task_status)


async def test_a_run_hook_overridden_by_a_subclass_is_not_bypassed() -> None:
    async with kept(WrappingRun()) as k:
        run_id = str(uuid.uuid4())
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.keeper.take, delivery(run_id))
            await wait_until(lambda: "submitted" in k.events(run_id))
            k.worker_type.ends["host:1"].set()
        assert isinstance(k.worker_type, WrappingRun) and k.worker_type.wrapped == 1
        assert k.events(run_id) == ["pending", "submitted", "completed"]


async def test_an_error_of_a_run_hook_after_its_start_crashes_the_run_not_the_worker() -> None:
    async with kept(FailingAfterStart()) as k:
        run_id = str(uuid.uuid4())
        message = delivery(run_id)
        await k.keeper.take(message)
        assert k.events(run_id) == ["pending", "submitted", "crashed"]
        crashed = [orjson.loads(e.body) for e in k.outbox._events][-1]
        assert crashed["data"]["reason"] == "monitoring-failed"
        assert not message.slot_held and not k.keeper.holds(uuid.UUID(run_id))
        # The worker goes on taking runs.
        second = str(uuid.uuid4())
        await k.keeper.take(delivery(second))
        assert k.worker_type.started == [run_id, second]


async def test_a_second_delivery_of_a_held_run_is_not_started_twice() -> None:
    async with kept() as k:
        run_id = str(uuid.uuid4())
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.keeper.take, delivery(run_id))
            await wait_until(lambda: k.worker_type.started)
            again = delivery(run_id, redelivered=True)
            await k.keeper.take(again)
            assert again.outcome == "acked" and not again.slot_held
            # Not a redelivery: dead-lettered; without a connection, settled for the
            # broker to deliver it again.
            copy = delivery(run_id)
            await k.keeper.take(copy)
            assert copy.settled and not copy.slot_held
            k.worker_type.ends["host:1"].set()
        assert k.worker_type.started == [run_id]


@pytest.mark.parametrize("worker_type", [StandInType, StandInStarter],
                         ids=["run-hook", "starts-runs-itself"])
async def test_a_cancel_stops_a_running_run_which_ends_cancelled(
    worker_type: type[StandInType],
) -> None:
    async with kept(worker_type()) as k:
        run_id = str(uuid.uuid4())
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.keeper.take, delivery(run_id))
            await wait_until(lambda: "submitted" in k.events(run_id))
            k.cancel(run_id)
        assert k.worker_type.killed == ["host:1"]
        assert k.events(run_id) == ["pending", "submitted", "cancelled"]


async def test_a_cancel_that_finds_the_failed_attempt_ended_ends_the_run_cancelled() -> None:
    """The cancel came while the attempt ran, but the attempt failed on its own before
    the stop reached it: not retried (a cancel never is), so the run ends cancelled, not
    crashed."""
    async with kept(EndsBeforeItsStop(), RETRIED_TWICE) as k:
        run_id = str(uuid.uuid4())
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.keeper.take, delivery(run_id))
            await wait_until(lambda: "submitted" in k.events(run_id))
            k.cancel(run_id)
        assert k.events(run_id) == ["pending", "submitted", "cancelled"], k.terminal_data(run_id)
        data = k.terminal_data(run_id)
        assert data["reason"] == "no longer wanted" and data["status_code"] == 3
        assert data["attempt"] == 1 and k.worker_type.started == [run_id]


async def test_a_cancel_during_a_start_that_fails_ends_the_run_cancelled() -> None:
    async with kept(FailsToStartOnceCancelled(), RETRIED_TWICE) as k:
        worker_type = k.worker_type
        assert isinstance(worker_type, FailsToStartOnceCancelled)
        run_id = str(uuid.uuid4())
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.keeper.take, delivery(run_id))
            await worker_type.starting.wait()
            k.cancel(run_id)
            worker_type.fail.set()
        assert k.events(run_id) == ["pending", "cancelled"], k.terminal_data(run_id)
        data = k.terminal_data(run_id)
        assert data["reason"] == "no longer wanted" and data.get("status_code") is None


async def test_a_cancel_that_finds_the_last_attempt_failed_leaves_it_crashed() -> None:
    """Without retries the failure is the run's own end, whatever cancel came late."""
    async with kept(EndsBeforeItsStop()) as k:
        run_id = str(uuid.uuid4())
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.keeper.take, delivery(run_id))
            await wait_until(lambda: "submitted" in k.events(run_id))
            k.cancel(run_id)
        assert k.events(run_id) == ["pending", "submitted", "crashed"]
        assert k.terminal_data(run_id)["reason"] == "exit-code"


async def test_a_run_cancelled_before_it_arrives_never_starts() -> None:
    async with kept() as k:
        run_id = str(uuid.uuid4())
        k.cancels.add(CancelRecord(uuid.UUID(run_id), "no longer wanted", time.time()))
        message = delivery(run_id)
        await k.keeper.take(message)
        assert message.outcome == "acked" and k.worker_type.started == []
        assert k.events(run_id) == ["cancelled"]


async def test_a_stopping_keeper_gives_back_what_comes_and_a_held_run() -> None:
    async with kept() as k:
        later = str(uuid.uuid4())
        held = delivery(later, run={"scheduled_start_time": time.time() + 30})
        async with anyio.create_task_group() as tg:
            tg.start_soon(k.keeper.take, held)
            await wait_until(lambda: "pending" in k.events(later))
            k.keeper.stop_taking()
            await k.keeper.drain(timeout=10, cancel_reason=lambda: "stopping")
        assert held.outcome == "requeued" and k.worker_type.started == []
        new = delivery(str(uuid.uuid4()))
        await k.keeper.take(new)
        assert new.outcome == "requeued"


async def test_an_invalid_message_is_not_run_nor_reported_until_it_is_dead_lettered() -> None:
    async with kept() as k:  # no connection: the copy to the dead-letter queue cannot be made
        bad = StandInDelivery(body=b"{not json")
        await k.keeper.take(bad)
        assert bad.settled and not bad.slot_held and k.worker_type.started == []
        assert EventType.RUN_REJECTED not in [e.type for e in k.outbox._events]


class SetsUpFirst(HeldSetUp, StandInType):
    """A worker type whose `run` hook sets the run up, until told to go on, before it
    starts it."""


async def test_a_run_whose_slot_is_lost_while_it_is_set_up_is_given_back_not_started() -> None:
    """Its connection broke: the broker has its message again, and delivers it again."""
    async with kept(SetsUpFirst()) as k:
        assert isinstance(k.worker_type, SetsUpFirst)
        run_id = str(uuid.uuid4())
        message = delivery(run_id)
        with anyio.fail_after(5):  # (a run started without its slot would not end)
            async with anyio.create_task_group() as tg:
                tg.start_soon(k.keeper.take, message)
                await k.worker_type.setting_up.wait()
                message.lost.set()
                k.keeper.life.slot_lost(uuid.UUID(run_id), "key:db")
                k.worker_type.set_up.set()
        assert k.worker_type.started == []
        assert k.events(run_id) == ["pending"]
        assert not k.keeper.holds(uuid.UUID(run_id))
        assert not k.keeper.ended_here(uuid.UUID(run_id))


async def test_a_run_whose_slot_is_lost_after_its_redelivery_was_taken_here_ends_slot_lost(
) -> None:
    """The broker no longer has its message (its redelivery was acknowledged as a
    duplicate of the run held here): it ends, without starting, as a slot-lost run."""
    async with kept(SetsUpFirst()) as k:
        assert isinstance(k.worker_type, SetsUpFirst)
        run_id = str(uuid.uuid4())
        message = delivery(run_id)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(k.keeper.take, message)
                await k.worker_type.setting_up.wait()
                message.lost.set()
                again = delivery(run_id, redelivered=True)
                await k.keeper.take(again)
                assert again.outcome == "acked"
                k.keeper.life.slot_lost(uuid.UUID(run_id), "key:db")
                k.worker_type.set_up.set()
        assert k.worker_type.started == []
        assert k.events(run_id) == ["pending", "crashed"]
        assert k.terminal_data(run_id)["reason"] == "slot-lost"


async def test_a_run_held_until_its_start_time_whose_slot_is_lost_is_not_started() -> None:
    async with kept() as k:
        run_id = str(uuid.uuid4())
        due = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30))
        message = delivery(run_id, run={"scheduled_start_time": due})
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(k.keeper.take, message)
                await wait_until(lambda: k.events(run_id) == ["pending"])
                k.keeper.life.slot_lost(uuid.UUID(run_id), "key:db")
        assert k.worker_type.started == []
        assert k.events(run_id) == ["pending", "crashed"]
        assert k.terminal_data(run_id)["reason"] == "slot-lost"
        assert message.outcome == "acked"
