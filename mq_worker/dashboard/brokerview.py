"""What the dashboard reads from and does on the broker: queue depths, dead letters, actions.

Queue depths come from RabbitMQ's management API when it answers (one request
for every queue), else from passive declares of the work queues the ledger
and the workers know. Dead letters are browsed by getting them without
acknowledging and closing the channel, which gives them back; a replay or a
discard acknowledges only the messages it acts on. Dead-letter operations
are serialised, since a browse hides the messages it holds from another one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote

import aio_pika
import aio_pika.abc
import aiohttp
import aiormq.exceptions
import anyio
import orjson
import structlog
from yarl import URL

from mq_worker import topology
from mq_worker.broker import TlsOptions, connect
from mq_worker.messages import RunMessage
from mq_worker.publisher import Publisher
from mq_worker.redaction import mask_text, masked
from mq_worker.signing import Signer
from mq_worker.topology import SIGNATURE_HEADER, SIGNATURE_V2_HEADER

log = structlog.get_logger("mq_worker.dashboard")

BROWSE_LIMIT = 500
_VOLATILE_HEADERS = {topology.DELIVERY_COUNT_HEADER, topology.DEATH_HEADER}


class DeadLetterError(ValueError):
    """An action on a dead letter that cannot be done, with the reason."""


@dataclass(frozen=True)
class QueueDepth:
    name: str
    ready: int | None
    unacknowledged: int | None
    consumers: int | None


@dataclass(frozen=True)
class DeadLetter:
    key: str  # stable while the message waits: a digest of its body and headers
    body: bytes
    headers: dict[str, Any]
    routing_key: str | None  # where a replay publishes it (on mq_worker.runs)

    @property
    def reason(self) -> str:
        reason = self.headers.get(topology.DEAD_LETTER_REASON_HEADER)
        if reason:
            return str(reason)
        deaths = self.headers.get(topology.DEATH_HEADER) or []
        if deaths and isinstance(deaths[0], dict):
            return f"broker: {deaths[0].get('reason', 'dead-lettered')}"
        return "-"

    @property
    def run_id(self) -> str | None:
        try:
            value = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None
        return str(value.get("id")) if isinstance(value, dict) and value.get("id") else None

    def body_text(self) -> str:
        """The body as shown: pretty JSON when it is JSON, secrets masked."""
        try:
            return orjson.dumps(masked(orjson.loads(self.body)),
                                option=orjson.OPT_INDENT_2).decode()
        except orjson.JSONDecodeError:
            return mask_text(self.body.decode(errors="replace"))

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "run_id": self.run_id, "reason": self.reason,
                "routing_key": self.routing_key,
                "headers": {k: _plain(v) for k, v in self.headers.items()
                            if k not in (SIGNATURE_HEADER, SIGNATURE_V2_HEADER)},
                "body": self.body_text()}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return mask_text(value) if isinstance(value, str) else value


def _key(body: bytes, headers: dict[str, Any]) -> str:
    stable = sorted((k, repr(v)) for k, v in headers.items() if k not in _VOLATILE_HEADERS)
    return hashlib.sha256(body + repr(stable).encode()).hexdigest()[:20]


def _replay_routing_key(headers: dict[str, Any]) -> str | None:
    candidates: list[str] = []
    if headers.get(topology.ROUTING_KEY_HEADER):
        candidates.append(str(headers[topology.ROUTING_KEY_HEADER]))
    for death in headers.get(topology.DEATH_HEADER) or []:
        if isinstance(death, dict):
            candidates.extend(str(k) for k in death.get("routing-keys") or [])
    work_queue = topology.parse_work_queue_name(str(headers.get(topology.QUEUE_HEADER) or ""))
    if work_queue is not None:
        candidates.append(topology.scheduled_routing_key(*work_queue))
    for key in candidates:
        # A parked run's key starts with its delay bits: replay to its work queue directly.
        position = key.find(topology.SCHEDULED_ROUTING_PREFIX)
        if position >= 0:
            return key[position:]
    return None


class BrokerView:
    """The dashboard's broker connection for reads and actions (not the live feed)."""

    def __init__(self, urls: Sequence[str], *, tls: TlsOptions | None = None,
                 signing_key_file: Path | None = None, management_url: str | None = None) -> None:
        self.urls = list(urls)
        self.tls = tls
        self.signing_key_file = signing_key_file
        self._signer = Signer.from_file(signing_key_file) if signing_key_file else None
        self.management_url = management_url or _default_management_url(self.urls[0])
        self._publisher: Publisher | None = None
        self._dead_lock = anyio.Lock()

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()

    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.urls, name="mq_worker dashboard publisher",
                                        tls=self.tls, signing_key_file=self.signing_key_file)
        return self._publisher

    # -- queues ------------------------------------------------------------------------

    async def queue_depths(
        self, known: Callable[[], Awaitable[Sequence[tuple[str, str]]]]
    ) -> tuple[str, list[QueueDepth]]:
        """(where from, the work queues and the dead-letter queue with their depths).

        `known` gives the (pool, queue) pairs to declare passively when the management
        API does not answer.
        """
        try:
            return "management API", await self._from_management()
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            log.debug("management API unavailable; passive declares", error=str(exc))
        names = sorted({topology.work_queue_name(p, q) for p, q in await known()}
                       | {topology.DEAD_QUEUE})
        return "passive declares", await self._passive(names)

    async def _from_management(self) -> list[QueueDepth]:
        url = URL(self.management_url)
        vhost = unquote(URL(self.urls[0]).path.lstrip("/")) or "/"
        amqp = URL(self.urls[0])
        auth = aiohttp.BasicAuth(amqp.user or "guest", amqp.password or "guest")
        api = url.with_path(url.path.rstrip("/") + f"/api/queues/{quote(vhost, safe='')}",
                            encoded=True)
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
                api, params={"columns": "name,messages_ready,messages_unacknowledged,consumers"},
                auth=auth) as response:
            if response.status != 200:
                raise ValueError(f"management API answered {response.status}")
            rows = await response.json()
        return [QueueDepth(r["name"], r.get("messages_ready"), r.get("messages_unacknowledged"),
                           r.get("consumers"))
                for r in rows if _shown(r["name"])]

    async def _passive(self, names: list[str]) -> list[QueueDepth]:
        result: list[QueueDepth] = []
        connection, _ = await connect(self.urls, name="mq_worker dashboard", tls=self.tls)
        try:
            for name in names:
                try:
                    channel = await connection.channel()
                    queue = await channel.declare_queue(name, passive=True)
                    declared = queue.declaration_result
                    result.append(QueueDepth(name, declared.message_count, None,
                                             declared.consumer_count))
                    await channel.close()
                except aiormq.exceptions.ChannelNotFoundEntity:
                    continue
        finally:
            await connection.close()
        return result

    # -- dead letters ------------------------------------------------------------------

    async def dead_letters(self, limit: int = BROWSE_LIMIT) -> list[DeadLetter]:
        """The first `limit` messages of `mq_worker.dead`, left in place."""
        async with self._dead_lock:
            connection, _ = await connect(self.urls, name="mq_worker dashboard", tls=self.tls)
            try:
                channel = await connection.channel()
                await topology.declare_dead_queue(await channel.get_underlay_channel())
                queue = await channel.get_queue(topology.DEAD_QUEUE, ensure=False)
                found: list[DeadLetter] = []
                while len(found) < limit:
                    message = await queue.get(no_ack=False, fail=False)
                    if message is None:
                        break
                    found.append(_dead_letter(message))
                return found  # closing the connection gives every message back
            finally:
                await connection.close()

    async def settle_dead_letters(self, keys: Sequence[str], action: str,
                                  edited_body: bytes | None = None) -> list[DeadLetter]:
        """Replay (`action` "replay") or discard the dead letters with these keys; those done.

        A replay publishes the message (or `edited_body`) to `mq_worker.runs` with the run
        routing key it had, confirmed and mandatory, before acknowledging the dead letter.
        """
        wanted = set(keys)
        done: list[DeadLetter] = []
        async with self._dead_lock:
            connection, _ = await connect(self.urls, name="mq_worker dashboard", tls=self.tls)
            try:
                channel = await connection.channel(publisher_confirms=True,
                                                   on_return_raises=True)
                queue = await channel.get_queue(topology.DEAD_QUEUE, ensure=False)
                runs = await channel.get_exchange(topology.RUNS_EXCHANGE, ensure=False)
                for _ in range(BROWSE_LIMIT):
                    if not wanted:
                        break
                    message = await queue.get(no_ack=False, fail=False)
                    if message is None:
                        break
                    letter = _dead_letter(message)
                    if letter.key not in wanted:
                        continue
                    wanted.discard(letter.key)
                    if action == "replay":
                        await self._republish(runs, letter, edited_body)
                    await message.ack()
                    done.append(letter)
            finally:
                await connection.close()
        return done

    async def _republish(self, exchange: aio_pika.abc.AbstractExchange, letter: DeadLetter,
                         edited_body: bytes | None) -> None:
        if letter.routing_key is None:
            raise DeadLetterError("no work queue is known for this message: discard it instead")
        if edited_body is not None:
            edited_body = edited_body.replace(b"\r\n", b"\n")
            if edited_body.strip() == letter.body_text().encode().strip():
                edited_body = None  # shown as it was (secrets masked): replay the original
        body = letter.body if edited_body is None else edited_body
        if letter.routing_key.startswith(topology.SCHEDULED_ROUTING_PREFIX):
            try:
                RunMessage.model_validate_json(body)
            except ValueError as exc:
                raise DeadLetterError(f"the edited run is not valid: {exc}") from None
        headers = {k: v for k, v in letter.headers.items()
                   if not k.startswith(topology.OWN_HEADER_PREFIX) and k not in _VOLATILE_HEADERS}
        kind, pool = _kind_and_pool(letter.routing_key)
        if self._signer is not None and kind is not None:
            headers.update(self._signer.headers(body, kind=kind, pool=pool))
        elif edited_body is None:  # as it was: its own signatures still hold
            for name in (SIGNATURE_V2_HEADER, SIGNATURE_HEADER):
                if name in letter.headers:
                    headers[name] = letter.headers[name]
        try:
            await exchange.publish(
                aio_pika.Message(body, content_type=topology.JSON_CONTENT_TYPE, headers=headers,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=letter.routing_key, mandatory=True)
        except aio_pika.exceptions.DeliveryError as exc:
            raise DeadLetterError(f"no work queue takes {letter.routing_key}: {exc}") from None


def _kind_and_pool(routing_key: str) -> tuple[Literal["run", "cancel"] | None, str]:
    """What a signature binds, from `run.scheduled.<pool>.<queue>` or `run.cancel.<pool>`."""
    parts = routing_key.split(".")
    if len(parts) >= 3 and parts[0] == "run" and parts[1] in ("scheduled", "cancel"):
        return ("run" if parts[1] == "scheduled" else "cancel"), parts[2]
    return None, ""


def _dead_letter(message: aio_pika.abc.AbstractIncomingMessage) -> DeadLetter:
    headers = dict(message.headers or {})
    return DeadLetter(_key(message.body, headers), message.body, headers,
                      _replay_routing_key(headers))


def _shown(name: str) -> bool:
    if name == topology.DEAD_QUEUE:
        return True
    return topology.parse_work_queue_name(name) is not None


def _default_management_url(amqp_url: str) -> str:
    amqp = URL(amqp_url)
    scheme = "https" if amqp.scheme == "amqps" else "http"
    return f"{scheme}://{amqp.host or '127.0.0.1'}:{15671 if scheme == 'https' else 15672}"

