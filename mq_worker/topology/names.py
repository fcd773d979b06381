"""The name of every exchange, queue, header and routing key mq_worker uses.

The wire contract's single source of names: other modules import them from here
(through `mq_worker.topology`) instead of typing them again.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Any

from mq_worker.errors import ConfigurationError

RUNS_EXCHANGE = "mq_worker.runs"
EVENTS_EXCHANGE = "mq_worker.events"
DEAD_QUEUE = "mq_worker.dead"
CANCELS_STREAM = "mq_worker.cancels"
DUE_EXCHANGE = "mq_worker.due"
# Pings (`mq-worker status` asking workers for a heartbeat now) have an exchange of
# their own, so that asking needs no right to publish events.
PING_EXCHANGE = "mq_worker.ping"
PING_ALL_ROUTING_KEY = "ping"
# What `mq-worker status` of earlier versions sends on EVENTS_EXCHANGE; still answered.
LEGACY_PING_ROUTING_KEY = "mq_worker.worker.ping"
# Heartbeats were once bound to each pool's election queue with this key.
LEGACY_HEARTBEAT_BINDING = "mq_worker.worker.heartbeat"

# What `mq-worker status` of earlier versions publishes; an event type of its own.
PING = LEGACY_PING_ROUTING_KEY
OUTPUT_EXCHANGE = "mq_worker.output"
LEDGER_QUEUE = "mq_worker.ledger"

# An event's routing key is its type, so these are routing keys and bindings too.
EVENT_TYPE_PREFIX = "mq_worker."
RUN_EVENT_PREFIX = "mq_worker.run."
WORKER_EVENT_PREFIX = "mq_worker.worker."
RUN_EVENTS_BINDING = RUN_EVENT_PREFIX + "*"

# Every message body mq_worker publishes, except events (CloudEvents' own type).
JSON_CONTENT_TYPE = "application/json"

# -- headers ------------------------------------------------------------------------

# Every header mq_worker sets starts with this; a replay from the dead queue drops them.
OWN_HEADER_PREFIX = "x-mq-worker-"
# Signature headers of run and cancel messages (see mq_worker.signing).
SIGNATURE_HEADER = "x-mq-worker-signature"  # v1: the body only; no longer accepted by workers
SIGNATURE_V2_HEADER = "x-mq-worker-signature-v2"  # v2: kind, pool, issued-at and body
# On a dead letter: how many received headers were left out to fit in one frame.
DROPPED_HEADERS_HEADER = "x-mq-worker-dropped-headers"
# What a worker writes on a message it dead-letters (and a refused worker event).
DEAD_LETTER_REASON_HEADER = "x-mq-worker-reason"
DEAD_LETTER_WORKER_HEADER = "x-mq-worker-worker"
DEAD_LETTERED_AT_HEADER = "x-mq-worker-dead-lettered-at"
# The work queue a message came from: on a dead letter, and on a run waiting for a slot.
QUEUE_HEADER = "x-mq-worker-queue"
ROUTING_KEY_HEADER = "x-mq-worker-routing-key"
# A waiting run sent back to its work queue because a slot of this target came free.
WOKEN_HEADER = "x-mq-worker-woken-for"
# A stream reader publishes a marker to its own stream to learn where "now" is.
MARKER_HEADER = "x-mq-worker-marker"
# The message a candidate reporter holds in its pool's election queue.
ELECTION_TOKEN_HEADER = "x-mq-worker-election-token"

# Headers and arguments of the broker itself.
DEATH_HEADER = "x-death"
DELIVERY_COUNT_HEADER = "x-delivery-count"
STREAM_OFFSET = "x-stream-offset"  # a stream consumer's argument and each delivery's header
# What the broker adds to a message it dead-letters; a message published again drops them.
BROKER_DEATH_HEADERS = (
    DEATH_HEADER, DELIVERY_COUNT_HEADER, "x-first-death-exchange", "x-first-death-queue",
    "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
    "x-last-death-reason",
)


def dead_letter_headers(*, reason: str, worker: str, queue: str,
                        routing_key: str) -> dict[str, Any]:
    """The headers a worker adds to a message it copies to DEAD_QUEUE."""
    return {
        DEAD_LETTER_REASON_HEADER: reason,
        DEAD_LETTER_WORKER_HEADER: worker,
        QUEUE_HEADER: queue,
        ROUTING_KEY_HEADER: routing_key,
        DEAD_LETTERED_AT_HEADER: datetime.now(UTC).isoformat(),
    }

DEFAULT_POOL = "default"
DEFAULT_QUEUE = "default"
DEFAULT_DELIVERY_LIMIT = 20

# Pool and queue names become words of routing keys and parts of queue names,
# so they may not contain dots or wildcards.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Every internal name has two dot-separated words, every work queue three, so
# no pool or queue name can collide with an internal one.
DELAY_LEVELS = 25
MAX_PARK_SECONDS = 2**DELAY_LEVELS - 1


# On a cancel that a worker copies back into the cancel stream: it has published the
# run's `cancelled` event itself (the run was waiting for a retry), so the worker that
# later takes the parked attempt drops it without a second event.
CANCEL_REPORTED_HEADER = "x-mq-worker-cancel-reported-by"


def check_name(kind: str, value: str) -> str:
    """Return `value` if it is a valid pool or queue name, else raise ConfigurationError."""
    if not _NAME.fullmatch(value):
        raise ConfigurationError(
            f"invalid {kind} name {value!r}: use 1-64 letters, digits, '_' or '-'"
        )
    return value


def work_queue_name(pool: str, queue: str) -> str:
    return f"mq_worker.{pool}.{queue}"


def parse_work_queue_name(name: str) -> tuple[str, str] | None:
    """(pool, queue) of a work queue's name; None for any other queue."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "mq_worker":
        return parts[1], parts[2]
    return None


SCHEDULED_ROUTING_PREFIX = "run.scheduled."
CANCEL_ROUTING_PREFIX = "run.cancel."
CANCELS_BINDING = CANCEL_ROUTING_PREFIX + "*"
# Every run's output batches (`output.<pool>.<run id>`).
ALL_OUTPUT_BINDING = "output.#"


def scheduled_routing_key(pool: str, queue: str) -> str:
    return f"{SCHEDULED_ROUTING_PREFIX}{pool}.{queue}"


def cancel_routing_key(pool: str) -> str:
    return f"{CANCEL_ROUTING_PREFIX}{pool}"


def output_routing_key(pool: str, run_id: str) -> str:
    """How a run's output batches are published to OUTPUT_EXCHANGE."""
    return f"output.{pool}.{run_id}"


def run_output_binding(run_id: str) -> str:
    """The binding that follows one run's output, whichever pool runs it."""
    return f"output.*.{run_id}"


def monitor_queue_name(pool: str) -> str:
    """The single-active-consumer queue that elects a pool's lost-worker reporter."""
    return f"mq_worker.monitor-{pool}"


def heartbeat_stream_name(pool: str) -> str:
    """The stream of a pool's worker events, replayed by a newly elected reporter."""
    return f"mq_worker.heartbeats-{pool}"


def cancel_snapshot_stream_name(pool: str) -> str:
    """The stream of snapshots of a pool's cancel window (see mq_worker.cancel_snapshots)."""
    return f"mq_worker.cancel-snapshots-{pool}"


def pool_routing_key(pool: str) -> str:
    """The extra routing key (a `BCC` header) of a pool's worker events on EVENTS_EXCHANGE."""
    return f"workers.{pool}"


def ping_routing_key(pool: str | None) -> str:
    """Routing key on PING_EXCHANGE of a ping to one pool's workers, or to all of them."""
    return PING_ALL_ROUTING_KEY if pool is None else f"{PING_ALL_ROUTING_KEY}.{pool}"


def delay_name(level: int) -> str:
    """Exchange and queue of delay level `level`; its messages wait 2**level seconds."""
    return f"mq_worker.delay-{level:02d}"


def due_binding_key(pool: str, queue: str) -> str:
    """How a work queue is bound to DUE_EXCHANGE: any delay bits, then its routing key."""
    return "*." * DELAY_LEVELS + scheduled_routing_key(pool, queue)


# -- work pools: pauses and shared limits -------------------------------------------

CONTROL_STREAM = "mq_worker.control"
CONTROL_BINDING = "control.*"


def control_routing_key(kind: str) -> str:
    """`control.pause`, `control.resume` or `control.limit`, published to RUNS_EXCHANGE."""
    return f"control.{kind}"


def _target_digest(target: str) -> str:
    return hashlib.sha256(target.encode()).hexdigest()[:32]


def limit_queue_name(target: str) -> str:
    """The quorum queue holding the free slot tokens of a limit's target."""
    return f"mq_worker.limit-{_target_digest(target)}"


def waiting_queue_name(target: str) -> str:
    """The quorum queue of runs waiting, in order of arrival, for a slot of `target`."""
    return f"mq_worker.waiting-{_target_digest(target)}"
