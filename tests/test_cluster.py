"""mq_worker on a real 3-node RabbitMQ cluster: replicated declarations, node loss, node restart.

The cluster is the throw-away one of `rabbitmq-cluster` (nodes mqc1..3@localhost,
AMQP ports 5681-5683), found on PATH or named by MQ_WORKER_CLUSTER_SCRIPT; the default
broker is not involved. The session fixture
starts the cluster if it is not running (and stops it again at the end if it
started it); every test works in a vhost of its own and brings back any node it
stopped or killed. Only one node is ever down at a time, so quorum is never lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import pytest

from mq_worker import Publisher, new_run
from mq_worker.events import Event
from mq_worker.topology import (
    CANCELS_STREAM,
    DEAD_QUEUE,
    DELAY_LEVELS,
    RUNS_EXCHANGE,
    delay_name,
    monitor_queue_name,
    scheduled_routing_key,
    work_queue_name,
)
from mq_worker.workers.process import ProcessWorker
from tests.helpers import (
    EventLog,
    WorkerProcess,
    event_log,
    probe,
    running_worker,
    started_runs,
    unique,
)

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

# The script that starts and stops the throw-away cluster: named by the environment, or on PATH.
SCRIPT = Path(os.environ.get("MQ_WORKER_CLUSTER_SCRIPT") or shutil.which("rabbitmq-cluster")
              or "rabbitmq-cluster")
NODES = (1, 2, 3)
WORK_QUEUE = work_queue_name("default", "default")
WORK_ROUTING_KEY = scheduled_routing_key("default", "default")


def node_name(node: int) -> str:
    return f"mqc{node}@localhost"


def amqp_port(node: int) -> int:
    return 5680 + node


class Cluster:
    """The nodes of `rabbitmq-cluster`, driven through its commands."""

    def __init__(self, script: Path) -> None:
        self.script = script
        self.down: set[int] = set()

    def command(self, *args: str, timeout: float = 150) -> str:
        result = subprocess.run([str(self.script), *args], capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmq-cluster {' '.join(args)} failed "
                               f"(exit {result.returncode}): {result.stderr[-2000:]}")
        return result.stdout

    def states(self) -> dict[int, str]:
        """{node: 'running' | 'down' | 'vm-up/app-stopped'} as `status` reports them."""
        result = subprocess.run([str(self.script), "status"], capture_output=True, text=True,
                                timeout=120)
        states = {}
        for line in result.stdout.splitlines():
            words = line.split()
            if words and words[0].startswith("mqc") and words[0].endswith("@localhost"):
                states[int(words[0][3])] = words[-1]
        return states

    def ctl(self, *args: str, node: int | None = None) -> str:
        """rabbitmqctl against `node`, or against any node this test has not taken down."""
        target = node if node is not None else min(set(NODES) - self.down)
        return self.command("ctl", str(target), *args, timeout=60)

    def kill(self, node: int) -> None:
        self.down.add(node)
        self.command("kill-node", str(node))

    def stop(self, node: int, *, app: bool = False) -> None:
        self.down.add(node)
        self.command("stop-node", str(node), *(["--app"] if app else []))

    def start(self, node: int) -> None:
        self.command("start-node", str(node))
        self.down.discard(node)

    def restore(self) -> None:
        """Start every node that is not running (after a test, whatever it did)."""
        for node, state in self.states().items():
            if state != "running":
                self.start(node)
        self.down.clear()

    # -- what the broker has ---------------------------------------------------------

    def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        out = self.ctl("list_queues", "-q", "-p", vhost, "--formatter", "json",
                       "name", "type", "members", "online", "leader", "arguments")
        return {row["name"]: row for row in json.loads(out or "[]")}

    def queue_depths(self, vhost: str) -> dict[str, tuple[int, int, int]]:
        """{queue: (messages, ready, unacknowledged)} of the queues holding messages.

        A quorum queue's dead-lettered messages not yet moved on (at-least-once) count
        in `messages` only.
        """
        out = self.ctl("list_queues", "-q", "-p", vhost, "--formatter", "json",
                       "name", "messages", "messages_ready", "messages_unacknowledged")
        depths = {row["name"]: (int(row["messages"] or 0), int(row["messages_ready"] or 0),
                                int(row["messages_unacknowledged"] or 0))
                  for row in json.loads(out or "[]")}
        return {name: depth for name, depth in depths.items() if any(depth)}

    def consumers(self, vhost: str, queue: str | None = None) -> list[dict[str, Any]]:
        out = self.ctl("list_consumers", "-q", "-p", vhost, "--formatter", "json",
                       "queue_name", "consumer_tag", "channel_pid")
        rows = json.loads(out or "[]")
        return [r for r in rows if queue is None or r["queue_name"] == queue]

    def connection_nodes(self, vhost: str) -> dict[str, set[int]]:
        """{connection name given by the client: nodes it is connected to}."""
        out = self.ctl("list_connections", "-q", "--formatter", "json",
                       "vhost", "port", "client_properties")
        found: dict[str, set[int]] = {}
        for row in json.loads(out or "[]"):
            if row["vhost"] != vhost:
                continue
            props = {key: value for key, _, value in row["client_properties"]}
            name = str(props.get("connection_name", ""))
            found.setdefault(name, set()).add(int(row["port"]) - 5680)
        return found


@dataclass
class ClusterVHost:
    """A vhost of the cluster, owned by one test."""

    name: str
    cluster: Cluster

    def url(self, node: int) -> str:
        return (f"amqp://guest:guest@127.0.0.1:{amqp_port(node)}/"
                f"{urllib.parse.quote(self.name, safe='')}")

    def url_args(self, *nodes: int) -> list[str]:
        """`--url` options for the nodes after the first (a worker process's first `--url`)."""
        return [arg for node in nodes[1:] for arg in ("--url", self.url(node))]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if not os.access(SCRIPT, os.X_OK):
        pytest.skip(f"the cluster script {SCRIPT} is missing (set MQ_WORKER_CLUSTER_SCRIPT "
                    "to its path, or put rabbitmq-cluster on PATH)")
    if shutil.which("epmd") is None and shutil.which("rabbitmq-server") is None:
        pytest.skip("RabbitMQ is not installed here: no cluster can be started")
    nodes = Cluster(SCRIPT)
    was_running = set(nodes.states().values()) == {"running"}
    if not was_running:
        nodes.command("start", timeout=240)
    try:
        yield nodes
    finally:
        nodes.restore()
        if not was_running:
            nodes.command("stop", timeout=240)


@pytest.fixture
def cvhost(cluster: Cluster) -> Iterator[ClusterVHost]:
    cluster.restore()
    name = f"c-{uuid.uuid4().hex[:12]}"
    cluster.ctl("add_vhost", name)
    cluster.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield ClusterVHost(name, cluster)
    finally:
        cluster.restore()
        cluster.ctl("delete_vhost", name)


async def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: function(*args, **kwargs))


async def eventually(condition: Callable[[], Any], timeout: float, what: str,
                     interval: float = 0.05) -> Any:
    """Wait until `condition()` (run in a thread: it may ask the broker) is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await in_thread(condition)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        await anyio.sleep(interval)


def replicated(row: dict[str, Any], kind: str) -> bool:
    nodes = {node_name(n) for n in NODES}
    return (row["type"] == kind and set(row["members"] or []) == nodes
            and set(row["online"] or []) == nodes)


def fully_online(cluster: Cluster, vhost: str) -> bool:
    """Every replicated queue of `vhost` has all its members online."""
    nodes = {node_name(n) for n in NODES}
    return all(set(row["online"] or []) == nodes for row in cluster.queues(vhost).values()
               if row["type"] != "classic")


def consumer_channels(cluster: Cluster, vhost: str) -> int:
    """How many channels consume the work queue (one per worker)."""
    return len({c["channel_pid"] for c in cluster.consumers(vhost, WORK_QUEUE)})


def health(port: int) -> tuple[int, str]:
    """(HTTP status, reason) of a worker process's /health."""
    status, body = health_body(port)
    return status, str(body.get("reason", body))


def worker_state(port: int) -> dict[str, Any]:
    """A worker process's health and outbox depth, for failure messages."""
    state = health_body(port)[1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(("mq_worker_outbox_depth", "mq_worker_reconnects_total")):
                    name, value = line.rsplit(" ", 1)
                    state[name] = value
    except OSError as exc:
        state["metrics"] = str(exc)
    return state


def health_body(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError as exc:
        return 0, {"reason": str(exc)}


@dataclass
class HealthWatch:
    """A worker's health status (200 while consuming) over time, polled every 20 ms."""

    status: Callable[[], int]
    changes: list[tuple[float, int]] = field(default_factory=list)   # (time, status)

    @classmethod
    def of_process(cls, port: int) -> HealthWatch:
        return cls(lambda: health(port)[0])

    @classmethod
    def of_worker(cls, worker: ProcessWorker) -> HealthWatch:
        return cls(lambda: 200 if worker.health()[0] else 503)

    async def run(self) -> None:
        while True:
            status = await in_thread(self.status)
            if not self.changes or self.changes[-1][1] != status:
                self.changes.append((time.time(), status))
            await anyio.sleep(0.02)

    def outage(self, since: float) -> tuple[float, float | None] | None:
        """(when it stopped consuming, when it consumed again or None) after `since`."""
        down = next((t for t, s in self.changes if t >= since and s != 200), None)
        if down is None:
            return None
        back = next((t for t, s in self.changes if t > down and s == 200), None)
        return down, back


def health_port(worker: WorkerProcess) -> int | None:
    for line in worker.log_lines():
        if line.get("event") == "health endpoint listening":
            return int(line["port"])
    return None


def disconnected(worker: WorkerProcess) -> list[tuple[float, float]]:
    """(lost, connected again) from a worker's log: when it had no session, by its own clock."""
    spans, lost = [], None
    for line in worker.log_lines():
        event, stamp = line.get("event"), line.get("timestamp")
        if not stamp:
            continue
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        if event == "connection lost; reconnecting" and lost is None:
            lost = at
        elif event == "connected" and lost is not None:
            spans.append((lost, at))
            lost = None
    if lost is not None:
        spans.append((lost, time.time()))
    return spans


def describe(events: list[Event]) -> list[str]:
    """A run's events in short: type@worker, redelivered, time."""
    return [f"{e.type.removeprefix('mq_worker.run.')}@{e.data.get('worker')}"
            f"{' (redelivered)' if e.data.get('redelivered') else ''} {e.time:%H:%M:%S.%f}"
            for e in events]


def clock() -> str:
    return f"{datetime.now(UTC):%H:%M:%S.%f}"


def at(seconds_from_now: float) -> datetime:
    return datetime.fromtimestamp(time.time() + seconds_from_now, UTC)


# -- a. what is declared is replicated ---------------------------------------------------


async def test_declared_queues_and_stream_are_replicated_on_every_node(
    cluster: Cluster, cvhost: ClusterVHost, tmp_path: Path
) -> None:
    urls = [cvhost.url(2), cvhost.url(3), cvhost.url(1)]
    async with running_worker(urls, prefetch_seconds=1.0) as worker:
        # A run due later is parked: the worker declares the delay ladder then.
        async with Publisher(cvhost.url(3)) as publisher:
            began = time.monotonic()
            await publisher.submit(new_run(probe(tmp_path), scheduled_start_time=at(30)))
        ladder = [delay_name(level) for level in range(DELAY_LEVELS)]
        await eventually(lambda: worker.metrics.parked.labels("default", "default")._value.get(),
                         60, "the run is parked")
        print(f"\nfirst run parked (ladder declared) {time.monotonic() - began:.2f} s after "
              "it was published")
        queues = await in_thread(cluster.queues, cvhost.name)
        worker.stop()
    for name in [WORK_QUEUE, DEAD_QUEUE, monitor_queue_name("default"), *ladder]:
        assert replicated(queues[name], "quorum"), (name, queues[name])
    assert replicated(queues[CANCELS_STREAM], "stream"), queues[CANCELS_STREAM]
    # The arguments documented in docs/protocol.md, and no group size that would cap them.
    work_args = {key: value for key, _, value in queues[WORK_QUEUE]["arguments"]}
    assert work_args["x-queue-type"] == "quorum"
    assert "x-quorum-initial-group-size" not in work_args
    stream_args = {key: value for key, _, value in queues[CANCELS_STREAM]["arguments"]}
    assert stream_args["x-queue-type"] == "stream"
    assert "x-initial-cluster-size" not in stream_args


# -- b. node loss under load ---------------------------------------------------------------
#
# Told in phases; every failure message starts with the phase it happened in:
#   1. two workers start, each on a node of its own, both consuming;
#   2. the faults are placed: the work queue's leader goes first, then another worker's node;
#   3. a mixed load is published through the surviving node while both faults happen;
#   4. every confirmed run ends;
#   5. the workers recover: alive, consuming, every slot free;
#   6. each run's events tell a possible story (one end per start, parked runs on time...);
#   7. the figures are printed, and every failover was quick.

STARTING = "1. two workers start"
PLACING = "2. placing the faults"
FAULTS = "3. load under two node faults"
ENDING = "4. every run ends"
RECOVERY = "5. the workers recover"
STORIES = "6. each run's events"
FAILOVER = "7. failover times"

LIMIT = 6


def in_phase(phase: str, *details: Any) -> str:
    """An assertion message that says which phase of the scenario failed."""
    return f"[{phase}] " + "; ".join(str(detail) for detail in details)


@dataclass
class Load:
    """What the test published, as confirmed by the broker."""

    runs: dict[str, str] = field(default_factory=dict)          # run id -> kind
    due: dict[str, float] = field(default_factory=dict)         # parked run id -> due time
    cancelled: set[str] = field(default_factory=set)            # run ids with a confirmed cancel
    unconfirmed: list[str] = field(default_factory=list)        # in flight when a node died
    errors: list[str] = field(default_factory=list)             # what their publishers got
    via_leader: list[str] = field(default_factory=list)         # confirmed through that node


@dataclass
class Failover:
    """One node taken down, and how long the workers on it took to consume again."""

    node: int
    how: str
    began: float                      # the command to take it down was given
    workers: list[str]                # the workers connected to it
    lost_at: float = 0.0              # the first of them noticed (stopped consuming)
    consuming_after: dict[str, float] = field(default_factory=dict)   # from lost_at
    next_start_after: dict[str, float] = field(default_factory=dict)  # from lost_at


@dataclass
class Placement:
    """Which node fails first (the work queue's leader), second, and which stays up."""

    leader: int
    victim_2: int
    survivor: int
    node_of: dict[str, set[int]]      # worker name -> nodes it is connected to


async def start_two_workers(
    cvhost: ClusterVHost, worker_processes: Callable[..., WorkerProcess],
) -> tuple[dict[str, WorkerProcess], dict[str, int]]:
    """Phase 1: cw-1 on node 1, then cw-2 on node 2, each consuming; their health ports."""
    common = ["--limit", str(LIMIT), "--prefetch-seconds", "3", "--health-port", "0",
              "--log-level", "INFO"]
    first = worker_processes(cvhost.url(1), *cvhost.url_args(1, 2, 3), *common, name="cw-1")
    await eventually(lambda: health_port(first), 30,
                     in_phase(STARTING, "the first worker serves /health"))
    await eventually(lambda: health(health_port(first) or 0)[0] == 200, 30,
                     in_phase(STARTING, "the first worker is consuming"))
    second = worker_processes(cvhost.url(2), *cvhost.url_args(2, 3, 1), *common, name="cw-2")
    workers = {w.name: w for w in (first, second)}
    await eventually(lambda: health_port(second), 30,
                     in_phase(STARTING, "the second worker serves /health"))
    ports = {name: health_port(w) or 0 for name, w in workers.items()}
    await eventually(lambda: all(health(p)[0] == 200 for p in ports.values()), 30,
                     in_phase(STARTING, "both workers are consuming"))
    return workers, ports


async def place_faults(cluster: Cluster, cvhost: ClusterVHost,
                       workers: dict[str, WorkerProcess]) -> Placement:
    """Phase 2: the work queue's leader fails first, then another worker's node."""
    leader = int((await in_thread(cluster.queues, cvhost.name))[WORK_QUEUE]["leader"][3])
    connected = await in_thread(cluster.connection_nodes, cvhost.name)
    node_of = {name: connected[f"mq_worker {name}"] for name in workers}
    assert node_of == {"cw-1": {1}, "cw-2": {2}}, in_phase(PLACING, "workers' nodes", node_of)
    victim_2 = next(min(nodes) for nodes in node_of.values() if leader not in nodes)
    survivor = ({1, 2, 3} - {leader, victim_2}).pop()
    print(f"\nwork queue leader: node {leader}; then node {victim_2}; "
          f"node {survivor} stays up (publisher and subscriber)")
    return Placement(leader, victim_2, survivor, node_of)


class LoadUnderFaults:
    """Phase 3: a mixed load through the surviving node, and runs published through the
    leader until it dies, while the leader is killed and the second node stopped."""

    def __init__(self, cluster: Cluster, cvhost: ClusterVHost, placement: Placement,
                 ports: dict[str, int], publisher: Publisher, runs_dir: Path) -> None:
        self.cluster = cluster
        self.cvhost = cvhost
        self.placement = placement
        self.publisher = publisher
        self.runs_dir = runs_dir
        self.load = Load()
        self.faults: list[Failover] = []
        self.progress: dict[str, str] = {}
        self.watches = {name: HealthWatch.of_process(port) for name, port in ports.items()}

    async def run(self) -> None:
        async with anyio.create_task_group() as watching:
            for watch in self.watches.values():
                watching.start_soon(watch.run)
            try:
                with anyio.fail_after(150):   # the load and both faults
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self.publish_load)
                        tg.start_soon(self.publish_via_leader)
                        tg.start_soon(self.faults_sequence)
            except TimeoutError:
                pytest.fail(in_phase(FAULTS, "the load and faults took over 150 s",
                                     self.progress))
            watching.cancel_scope.cancel()
        for run_id in self.load.via_leader:
            self.load.runs[run_id] = "via-leader"

    async def submit(self, kind: str, command: str, due_in: float | None = None,
                     run_id: str | None = None) -> str:
        """Publish through the surviving node: every publish must be confirmed."""
        load = self.load
        run = new_run(command, scheduled_start_time=at(due_in) if due_in else None, id=run_id)
        self.progress["load"] = f"publishing run {len(load.runs) + 1} ({kind}) since {clock()}"
        with anyio.fail_after(40):
            await self.publisher.submit(run)
        load.runs[str(run.id)] = kind
        if due_in:
            assert run.scheduled_start_time is not None
            load.due[str(run.id)] = run.scheduled_start_time.timestamp()
        return str(run.id)

    async def cancel(self, run_id: str) -> None:
        self.progress["load"] = f"publishing cancel {len(self.load.cancelled) + 1} since {clock()}"
        with anyio.fail_after(40):
            await self.publisher.cancel(run_id, reason="not needed")
        self.load.cancelled.add(run_id)

    async def publish_load(self) -> None:
        """Bursts of short runs with some longer ones, parked and cancelled runs."""
        for burst in range(24):
            for i in range(10):
                sleep = "1.5" if i % 5 == 0 else "0.2"
                await self.submit("short", f"sleep {sleep}")
            if burst % 3 == 0:   # parked a few seconds ahead, starts on time
                await self.submit("parked", probe(self.runs_dir), due_in=6 + burst % 4)
            if burst % 4 == 1:   # cancelled while parked
                await self.cancel(await self.submit("cancelled", probe(self.runs_dir), due_in=8))
            if burst % 4 == 3:   # cancelled before it is published
                run_id = str(uuid.uuid4())
                await self.cancel(run_id)
                await self.submit("cancelled", probe(self.runs_dir), run_id=run_id)
            await anyio.sleep(0.8)   # pacing: the load spans the faults
        self.progress["load"] = f"done at {clock()}"

    async def publish_via_leader(self) -> None:
        """Runs published through the node that is killed (four in flight), until it dies.

        A plain confirmed publisher, as an outside client: a publish that fails is
        one the node had received but not confirmed when it died.
        """
        load, leader = self.load, self.placement.leader
        await eventually(lambda: len(load.runs) >= 40, 60,
                         in_phase(FAULTS, "40 runs are published"))
        connection = await aio_pika.connect(self.cvhost.url(leader))
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(RUNS_EXCHANGE)

        async def one_at_a_time() -> None:
            while not channel.is_closed:
                run = new_run("true")
                message = aio_pika.Message(
                    run.model_dump_json(exclude_none=True).encode(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                try:
                    await exchange.publish(message, WORK_ROUTING_KEY, mandatory=True,
                                           timeout=10)
                except Exception as exc:
                    load.unconfirmed.append(str(run.id))
                    load.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                load.via_leader.append(str(run.id))
                await anyio.sleep(0.05)

        self.progress["via_leader"] = f"publishing through node {leader} since {clock()}"
        async with anyio.create_task_group() as publishers:
            for _ in range(4):
                publishers.start_soon(one_at_a_time)
        with contextlib.suppress(Exception), anyio.move_on_after(5):
            await connection.close()
        self.progress["via_leader"] = f"done at {clock()}"

    async def faults_sequence(self) -> None:
        placement = self.placement
        await eventually(lambda: len(self.load.runs) >= 50, 60,
                         in_phase(FAULTS, "50 runs are published"))
        await self.outage(placement.leader, "kill")
        # Both workers may have moved while the leader was down: read where they are once
        # each is connected again.
        connected_now = await eventually(lambda: (lambda found: found if all(
            found.get(f"mq_worker {name}") for name in placement.node_of) else None)(
                self.cluster.connection_nodes(self.cvhost.name)), 60,
            in_phase(FAULTS, "both workers are connected again"))
        for name in placement.node_of:
            placement.node_of[name] = connected_now[f"mq_worker {name}"]
        await self.outage(placement.victim_2, "stop")
        self.progress["faults"] = f"done at {clock()}"

    async def outage(self, node: int, how: str) -> None:
        """Take `node` down (`kill` or `stop`), start it again, wait until it is back."""
        self.progress["faults"] = f"{how} node {node} at {clock()}"
        await self.take_down(node, how)
        self.progress["faults"] = f"starting node {node} at {clock()}"
        await in_thread(self.cluster.start, node)
        self.progress["faults"] = f"waiting for node {node} in the queues since {clock()}"
        await eventually(lambda: fully_online(self.cluster, self.cvhost.name), 60,
                         in_phase(FAULTS, f"node {node} is back in the queues"))

    async def take_down(self, node: int, how: str) -> Failover:
        on_node = [name for name, nodes in self.placement.node_of.items() if node in nodes]
        fault = Failover(node, how, time.time(), on_node)
        self.faults.append(fault)
        if how == "kill":
            await in_thread(self.cluster.kill, node)
        else:
            await in_thread(self.cluster.stop, node)
        outages = {}
        for name in on_node:
            outages[name] = await eventually(
                lambda n=name: (lambda o: o if o and o[1] else None)(
                    self.watches[n].outage(fault.began)),
                60, in_phase(FAULTS, f"{name} consumes again after node {node} went down"))
        # No worker on the node (both moved away after the first fault): nothing to notice.
        fault.lost_at = min((down for down, _ in outages.values()), default=fault.began)
        for name, (_, back) in outages.items():
            fault.consuming_after[name] = back - fault.lost_at
        return fault


async def wait_every_run_ends(events: EventLog, load: Load, cluster: Cluster,
                              cvhost: ClusterVHost, ports: dict[str, int]) -> None:
    """Phase 4. A run parked in the delay ladder whose hop between two queues was caught by
    the node failure comes back when RabbitMQ retries that dead-letter hop,
    `dead_letter_worker_publisher_confirm_timeout` (180 s) later: runs with a start time
    get that long, the others 90 s."""
    timed = [r for r in load.runs if r in load.due]
    for ids, timeout in (([r for r in load.runs if r not in load.due], 90), (timed, 210)):
        try:
            await events.wait_terminal(ids, timeout=timeout)
        except TimeoutError:
            missing = [r for r in ids if not events.terminal(r)]
            pytest.fail(in_phase(
                ENDING, f"{len(missing)} runs have no terminal event",
                [(r, load.runs[r], describe(events.of(r))) for r in missing[:5]],
                f"workers: {[worker_state(p) for p in ports.values()]}",
                f"queues: {await in_thread(cluster.queue_depths, cvhost.name)}"))


def time_next_starts(events: EventLog, faults: list[Failover], names: list[str]) -> None:
    """When each worker started its next run after each fault was noticed."""
    for fault in faults:
        for name in names:
            times = [e.time.timestamp() for e in unique(events.events)
                     if e.type == "mq_worker.run.submitted" and e.data["worker"] == name
                     and e.time.timestamp() > fault.lost_at]
            if times:
                fault.next_start_after[name] = min(times) - fault.lost_at


async def check_recovery(cluster: Cluster, cvhost: ClusterVHost,
                         workers: dict[str, WorkerProcess], ports: dict[str, int]) -> None:
    """Phase 5: both workers survived, are consuming, and the broker lists their consumers;
    with every run ended, no slot is left taken."""
    assert all(w.process.poll() is None for w in workers.values()), in_phase(
        RECOVERY, "a worker exited", {n: w.process.poll() for n, w in workers.items()})
    await eventually(lambda: all(health_body(p)[0] == 200
                                 and health_body(p)[1]["free_slots"] == LIMIT
                                 and health_body(p)[1]["in_flight"] == 0
                                 for p in ports.values()), 10,
                     in_phase(RECOVERY, "every slot is free again"))
    consumers = await in_thread(cluster.consumers, cvhost.name, WORK_QUEUE)
    assert len({c["channel_pid"] for c in consumers}) >= 2, in_phase(
        RECOVERY, "consumers of the work queue", consumers)


@dataclass
class Stories:
    """What phase 6 counted."""

    duplicates: list[str] = field(default_factory=list)   # runs started twice
    given_back: int = 0                                   # deliveries taken again, not started
    late: dict[str, float] = field(default_factory=dict)  # parked run -> seconds after due


def check_stories(events: EventLog, load: Load, runs_dir: Path,
                  workers: dict[str, WorkerProcess], faults: list[Failover]) -> Stories:
    """Phase 6: each run's events, as a subscriber saw them, tell a possible story."""
    offline = {name: disconnected(w) for name, w in workers.items()}
    found = Stories()
    for run_id, kind in load.runs.items():
        mine = unique(events.of(run_id))
        story = (run_id, kind, describe(mine))
        terminal = [e for e in mine if e.is_terminal]
        submitted = [e for e in mine if e.type == "mq_worker.run.submitted"]
        if kind == "cancelled":
            assert [e.type for e in terminal] == ["mq_worker.run.cancelled"], in_phase(
                STORIES, "a cancelled run ends cancelled", story)
            assert not submitted and run_id not in started_runs(runs_dir), in_phase(
                STORIES, "a cancelled run never starts", story)
            continue
        # One terminal event per start; a run caught mid-start by the loss of its
        # worker's node (started, acknowledgement lost) may be started once more.
        by_worker = [e.data["worker"] for e in terminal]
        assert 1 <= len(terminal) <= 2 and len(set(by_worker)) == len(by_worker), in_phase(
            STORIES, "one or two ends, by different workers", story)
        assert {e.type for e in terminal} == {"mq_worker.run.completed"}, in_phase(
            STORIES, "every end is completed", story)
        assert len(submitted) == len(terminal), in_phase(STORIES, "one end per start", story)
        for name in by_worker:
            # Each worker's events of the run, in order. A run taken just before the
            # worker lost its connection, not yet started, is taken again (redelivered).
            seq = [e for e in mine if e.data["worker"] == name]
            types = [e.type.removeprefix("mq_worker.run.") for e in seq]
            assert types[-2:] == ["submitted", "completed"], in_phase(
                STORIES, f"{name} ends with submitted, completed", story)
            assert len(types) >= 3 and set(types[:-2]) == {"pending"}, in_phase(
                STORIES, f"{name} only took it (pending) before", story)
            assert all(e.data["redelivered"] for e in seq[1:-2]), in_phase(
                STORIES, f"{name} took it again only as a redelivery", story)
            found.given_back += len(types) - 3
            # A delivery that reached the worker after it lost that connection is never
            # started: the broker has already taken it back and delivers it again.
            pending = seq[-3]
            assert not any(lost <= pending.time.timestamp() <= back
                           for lost, back in offline[name]), in_phase(
                STORIES, f"{name} started a delivery of a connection it had lost", story)
        if len(terminal) == 2:
            found.duplicates.append(run_id)
            assert any(e.type == "mq_worker.run.pending" and e.data["redelivered"]
                       for e in mine), in_phase(STORIES, "a second start is a redelivery", story)
        if kind == "parked":
            began = started_runs(runs_dir)[run_id]["t"]
            assert began >= load.due[run_id], in_phase(
                STORIES, "a parked run starts on time, not before", *story, began,
                load.due[run_id])
            found.late[run_id] = began - load.due[run_id]
    assert len(found.duplicates) <= LIMIT * len(faults), in_phase(
        STORIES, "at most a worker's slots started twice per fault", found.duplicates)
    assert len(faults) == 2, in_phase(STORIES, "both faults happened", faults)
    parked_logged = {line.get("run_id") for w in workers.values() for line in w.log_lines()
                     if line.get("event") == "run parked until due"}
    assert parked_logged & {r for r, k in load.runs.items() if k == "parked"}, in_phase(
        STORIES, "the workers logged parking runs")
    return found


def report_and_check_failovers(load: Load, faults: list[Failover], stories: Stories,
                               events: EventLog, workers: dict[str, WorkerProcess],
                               leader: int) -> None:
    """Phase 7: the figures of the run, and every worker consumed again within 30 s."""
    unconfirmed_ran = [r for r in load.unconfirmed if events.terminal(r)]
    late = stories.late
    print(f"runs confirmed: {len(load.runs)} ({sum(k == 'parked' for k in load.runs.values())} "
          f"parked, {len(load.cancelled)} cancels, {len(load.via_leader)} through node {leader}); "
          f"unconfirmed: {len(load.unconfirmed)} ({len(unconfirmed_ran)} of them ran anyway); "
          f"started twice: {len(stories.duplicates)}; taken again by the same worker: "
          f"{stories.given_back}; parked runs started {min(late.values()):.3f}-"
          f"{max(late.values()):.3f} s after their time")
    for error in load.errors:
        print(f"unconfirmed publish: {error}")
    for run_id in stories.duplicates:
        print(f"started twice: {run_id}: " + ", ".join(describe(unique(events.of(run_id)))))
    for fault in faults:
        print(f"node {fault.node} ({fault.how}) at "
              f"{datetime.fromtimestamp(fault.lost_at, UTC):%H:%M:%S.%f}: "
              f"noticed {fault.lost_at - fault.began:.2f} s "
              "after the command; from then: consuming again after "
              + ", ".join(f"{n} {s:.2f} s" for n, s in fault.consuming_after.items())
              + "; next run started after "
              + ", ".join(f"{n} {s:.2f} s" for n, s in fault.next_start_after.items()))
        for name in fault.workers:
            assert fault.consuming_after[name] < 30, in_phase(
                FAILOVER, f"{name} consumed again {fault.consuming_after[name]:.1f} s after "
                f"node {fault.node} ({fault.how}) went down")
    for name, worker in workers.items():   # what the worker said about its connections
        for line in worker.log_lines():
            if line.get("level") in ("warning", "error") or line.get("event") == "connected":
                print(name, line.get("timestamp"), line.get("level"), line.get("event"),
                      line.get("error") or line.get("url") or line.get("run_id") or "")


@pytest.mark.timeout(480)   # about 60 s; longer only when a parked run waits for a retried hop
async def test_workers_survive_the_loss_of_a_node(
    cluster: Cluster, cvhost: ClusterVHost, worker_processes: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    workers, ports = await start_two_workers(cvhost, worker_processes)
    placement = await place_faults(cluster, cvhost, workers)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    async with event_log(cvhost.url(placement.survivor)) as events, \
            Publisher(cvhost.url(placement.survivor)) as publisher:
        scenario = LoadUnderFaults(cluster, cvhost, placement, ports, publisher, runs_dir)
        await scenario.run()
        await wait_every_run_ends(events, scenario.load, cluster, cvhost, ports)
        time_next_starts(events, scenario.faults, list(workers))
    await check_recovery(cluster, cvhost, workers, ports)
    stories = check_stories(events, scenario.load, runs_dir, workers, scenario.faults)
    report_and_check_failovers(scenario.load, scenario.faults, stories, events, workers,
                               placement.leader)


# -- c. a node restarted under a worker ------------------------------------------------------


async def test_worker_consumes_again_after_its_node_restarts(
    cluster: Cluster, cvhost: ClusterVHost, tmp_path: Path
) -> None:
    node, other = 3, 1
    async with event_log(cvhost.url(other)) as events, \
            running_worker(cvhost.url(node)) as alone, \
            running_worker([cvhost.url(node), cvhost.url(other)]) as peer, \
            anyio.create_task_group() as watching:
        watches = {w.name: HealthWatch.of_worker(w) for w in (alone, peer)}
        for watch in watches.values():
            watching.start_soon(watch.run)
        await eventually(lambda: consumer_channels(cluster, cvhost.name) == 2, 20,
                         "both workers consume")
        began = time.time()
        await in_thread(cluster.stop, node, app=True)
        await eventually(lambda: cluster.connection_nodes(cvhost.name).get(
            f"mq_worker {peer.name}") == {other}, 20, "the peer reconnects to another node")
        assert not alone.connected
        # Runs published while the node is down wait in the queue on the other nodes.
        async with Publisher(cvhost.url(other)) as publisher:
            during = [await publisher.submit(new_run(probe(tmp_path))) for _ in range(3)]
        peer_outage = await eventually(
            lambda: (lambda o: o if o and o[1] else None)(watches[peer.name].outage(began)),
            30, "the worker with another address fails over")
        await in_thread(cluster.start, node)
        restarted = time.time()
        alone_outage = await eventually(
            lambda: (lambda o: o if o and o[1] else None)(watches[alone.name].outage(began)),
            60, "the worker with one address reconnects after the restart")
        # The broker lists both workers' consumers again.
        await eventually(lambda: consumer_channels(cluster, cvhost.name) == 2, 20,
                         "both consumers are back")
        # Runs published now go to the restarted worker alone: its consumer works.
        peer.stop()
        await eventually(lambda: consumer_channels(cluster, cvhost.name) == 1, 20,
                         "the peer has stopped")
        async with Publisher(cvhost.url(node)) as publisher:
            after = [await publisher.submit(new_run(probe(tmp_path))) for _ in range(4)]
        ids = [str(r.id) for r in during + after]
        await events.wait_terminal(ids, timeout=30)
        watching.cancel_scope.cancel()
    for run_id in ids:
        assert [e.type for e in unique(events.terminal(run_id))] == ["mq_worker.run.completed"]
    for run in after:
        assert events.terminal(run.id)[0].data["worker"] == alone.name
    assert set(ids) <= set(started_runs(tmp_path))
    peer_down, peer_back = peer_outage
    alone_back = alone_outage[1]
    assert alone_back is not None and peer_back is not None
    print(f"\nnode {node} app stopped: the peer noticed {peer_down - began:.2f} s after the "
          f"command and consumed again {peer_back - peer_down:.2f} s later (other node); the "
          f"single-address worker consumed again {alone_back - restarted:.2f} s after "
          "the node was back")
