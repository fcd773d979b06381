"""The session supervisor: connects (trying each node of a cluster in turn), backs off,
declares the pool, opens the channels, and runs each session's tasks until the
connection breaks; then does it again. Errors no reconnection can fix are raised."""

from __future__ import annotations

import time
from typing import Any

import aio_pika.abc
import aiormq.abc
import aiormq.exceptions
import anyio

from mq_worker import topology
from mq_worker.broker import connect, raise_on_server_cancel
from mq_worker.cancellation import CancelFollower
from mq_worker.consumer import RunConsumer
from mq_worker.errors import BrokerError, ConfigurationError, TopologyMismatch
from mq_worker.fencing import follow_own_reports
from mq_worker.metrics import WorkerMetrics
from mq_worker.outbox import Outbox
from mq_worker.output import OutputShipper
from mq_worker.pool_control import PoolControl
from mq_worker.settings import WorkerSettings
from mq_worker.workers.fenced import Fencing
from mq_worker.workers.heartbeats import Heartbeats
from mq_worker.workers.link import SESSION_ERRORS, Link, Session
from mq_worker.workers.reporter import Reporter

# Errors no reconnection can fix: `serve()` stops the worker with them.
FATAL_ERRORS = (TopologyMismatch, ConfigurationError)
_STABLE_SESSION_SECONDS = 10.0
_MAX_BACKOFF_SECONDS = 5.0


class SessionSupervisor:
    def __init__(self, *, settings: WorkerSettings, link: Link, consumer: RunConsumer,
                 queue_names: list[str], cancels: CancelFollower, fencing: Fencing,
                 heartbeats: Heartbeats, pool_control: PoolControl, outbox: Outbox,
                 output: OutputShipper, reporter: Reporter, metrics: WorkerMetrics,
                 ready: anyio.Event, log: Any) -> None:
        self._settings = settings
        self._link = link
        self._consumer = consumer
        self._queue_names = queue_names
        self._cancels = cancels
        self._fencing = fencing
        self._heartbeats = heartbeats
        self._pool_control = pool_control
        self._outbox = outbox
        self._output = output
        self._report = reporter
        self._metrics = metrics
        self._ready = ready
        self._log = log

    async def run_forever(self) -> None:
        """One session after another; raises one of FATAL_ERRORS when serving is hopeless."""
        settings = self._settings
        index, backoff, first = 0, 0.2, True
        while True:
            try:
                connection, index = await connect(
                    settings.url, name=f"mq_worker {settings.name}", tls=settings.tls,
                    start=index,
                )
            except BrokerError as exc:
                self._log.warning("broker unreachable; retrying", error=str(exc),
                                  retry_in=backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
                continue
            except ConfigurationError as exc:  # the TLS files cannot be used
                if first:
                    raise
                # Mid-rotation, most likely: runs are going on; retry like a broker error.
                self._log.warning("cannot use the TLS files; retrying", error=str(exc),
                                  retry_in=backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
                continue
            if not first:
                self._metrics.reconnects.inc()
            first = False
            session_began = time.monotonic()
            fatal: BaseException | None = None
            try:
                await self._serve_session(connection)
            except* FATAL_ERRORS as group:
                fatal = group.exceptions[0]
            except* SESSION_ERRORS as group:
                self._log.warning(
                    "connection lost; reconnecting",
                    error="; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions),
                )
                if group.subgroup(aiormq.exceptions.InvalidFrameError) is not None:
                    self._cancels.connection_broke_on_an_undecodable_frame()
            except* Exception:
                self._log.exception("unexpected error in the connection; reconnecting")
            finally:
                self._link.current = None
                self._link.disconnected_at = time.monotonic()
                self._metrics.connected.set(0)
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await connection.close()
            if fatal is not None:
                raise fatal
            index += 1  # on a cluster, try another node first
            # A session refused at once (no permission, a queue declared with other
            # arguments by someone else) must not turn into a reconnect storm.
            if time.monotonic() - session_began < _STABLE_SESSION_SECONDS:
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
            else:
                backoff = 0.2

    async def _serve_session(self, connection: aio_pika.abc.AbstractConnection) -> None:
        settings = self._settings
        # Returned mandatory publishes (a park or dead letter to a deleted queue) must fail.
        channels = [await connection.channel(publisher_confirms=c, on_return_raises=c)
                    for c in (False, True, False, False)]
        raw = [await c.get_underlay_channel() for c in channels]
        session = Session(connection, raw[0], raw[1], raw[2])
        queues = list(settings.queue)
        await topology.declare_pool(raw[1], settings.pool, queues, settings.queue_options)
        await self._pool_control.declare(raw[1])
        self._log.info("connected", url=str(connection), queues=queues)
        async with anyio.create_task_group() as tg:
            async def _watch(closed: Any) -> None:
                await closed
                # Whichever watcher wakes first names the cause: a frame the client could
                # not decode must be recognised however the session ends.
                if isinstance(reason := _why_closed(raw[0].connection),
                              aiormq.exceptions.InvalidFrameError):
                    raise reason
                raise ConnectionError("the broker closed the connection or a channel")

            tg.start_soon(_watch, connection.closed())
            for channel in channels:
                tg.start_soon(_watch, channel.closed())
            # First: the runs still running take their shared-limit slots again.
            tg.start_soon(self._pool_control.maintain, raw[3], session.publish)
            # Before anything unconfirmed goes out: endings peers may have reported are handed over.
            self._fencing.check_lease()
            tg.start_soon(self._outbox.publish_forever, session.publish)
            # A consumer of the cancel stream or the monitor dropped by the broker ends the session.
            tg.start_soon(raise_on_server_cancel, session.aux, "the cancel stream or the monitor")
            tg.start_soon(self._output.ship_forever, connection)
            await tg.start(self._cancels.follow, session.aux, session.publish)
            await follow_own_reports(session.aux, settings.name, self._fencing.reported_lost,
                                     verify=self._heartbeats.verify,
                                     on_refused=self._metrics.refused_reports.inc)
            await tg.start(self._pool_control.follow, session.aux, session.publish)
            self._link.current = session
            self._metrics.connected.set(1)
            tg.start_soon(self._heartbeats.monitor.run, session.aux, settings.heartbeat_seconds,
                          session.publish)
            self._report.worker_started()
            tg.start_soon(self._heartbeats.beat_forever)
            tg.start_soon(self._consumer.run, session.runs, self._queue_names)
            self._ready.set()


def _why_closed(connection: aiormq.abc.AbstractConnection) -> BaseException | None:
    """The exception `connection` closed with, if it has closed with one."""
    closing = connection.closing
    if not closing.done() or closing.cancelled():
        return None
    return closing.exception()
