"""`mq-worker start --processes N`: N worker processes under one supervisor.

Each child is a full worker (`mq-worker start` with the same options) with its own
connection, the name `<name>-<i>` (stable, so each keeps its own outbox spool across
restarts) and a share of the limit: `limit // N` each, the first `limit % N` children one
more (limit 10 over 4: 3, 3, 2, 2). A limit below N is a configuration error.

A child is linked to the supervisor by a socket pair whose end it inherits (the hidden
option `--supervisor-fd`): the child writes the port of its own health endpoint (on
127.0.0.1, an ephemeral port) and then waits on the socket; end of file there means the
supervisor is gone, and the child stops gracefully rather than run unsupervised.

Children run in a session (and process group) of their own, so a terminal's Ctrl-C
reaches only the supervisor, which forwards SIGTERM, SIGINT and SIGHUP to every child, a
second signal too (which stops the children at once). A child that dies while the
supervisor is not stopping is restarted after a back-off (1 s, doubling to 30 s; reset
after a child has lived a minute). A child that exits 2 (a configuration error) before it
ever reported its health port stops the supervisor with exit code 2: restarting would
fail the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream

from mq_worker import sd_notify

log = structlog.get_logger("mq_worker.supervisor")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
HEALTHY_LIFETIME = 60.0
CONFIGURATION_EXIT = 2


def split_limit(limit: int, processes: int) -> list[int]:
    """Each child's share of `limit`: equal, the first `limit % processes` one more."""
    if processes < 1 or limit < processes:
        raise ValueError(f"a limit of {limit} cannot give each of {processes} processes a slot")
    base, extra = divmod(limit, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


def options_argv(options: Mapping[str, Any]) -> list[str]:
    """Command-line options that give a child the settings given to the supervisor."""
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{name.replace('_', '-')}")
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            argv += [flag, str(item) if not isinstance(item, Path) else os.fspath(item)]
    return argv


async def _first_line(link: anyio.abc.ByteReceiveStream) -> bytes:
    """What a child says first (its health port), or b"" if it dies before saying it."""
    try:
        return await BufferedByteReceiveStream(link).receive_until(b"\n", 64)
    except (anyio.IncompleteRead, anyio.DelimiterNotFound, anyio.BrokenResourceError):
        return b""


@dataclass
class Child:
    """One worker process and what the supervisor knows about it."""

    index: int
    name: str
    limit: int
    process: anyio.abc.Process | None = None
    health_port: int | None = None
    ever_ready: bool = False
    restarts: int = 0


class Supervisor:
    """Starts, watches, restarts and stops the worker processes."""

    def __init__(self, options: Mapping[str, Any], *, name: str, limit: int, processes: int,
                 python: str = sys.executable) -> None:
        self.options = {k: v for k, v in options.items()
                        if k not in ("name", "limit", "processes", "health_port", "health_host")}
        self.python = python
        self.children = [Child(i, f"{name}-{i}", share)
                         for i, share in enumerate(split_limit(limit, processes))]
        self.stopping = False
        self.exit_code = 0
        self._signals_sent = 0
        self._stopped = anyio.Event()

    def argv(self, child: Child, supervisor_fd: int) -> list[str]:
        return [self.python, "-m", "mq_worker", "start", *options_argv(self.options),
                "--name", child.name, "--limit", str(child.limit), "--processes", "1",
                "--health-port", "0", "--health-host", "127.0.0.1",
                "--supervisor-fd", str(supervisor_fd)]

    async def run(self) -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._forward_signals)
            tg.start_soon(self._notify_systemd)
            async with anyio.create_task_group() as children:
                for child in self.children:
                    children.start_soon(self._keep, child)
            tg.cancel_scope.cancel()
        return self.exit_code

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Forward `sig` to every child; the first call also ends restarting."""
        self.stopping = True
        self._stopped.set()
        self._signals_sent += 1
        for child in self.children:
            process = child.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.Signals(sig))

    async def _forward_signals(self) -> None:
        with anyio.open_signal_receiver(*FORWARDED_SIGNALS) as received:
            async for sig in received:
                log.info("forwarding signal to the worker processes", signal=sig.name,
                         processes=len(self.children))
                if self._signals_sent == 0:
                    sd_notify.notify("STOPPING=1", "STATUS=stopping: draining runs")
                self.stop(sig)

    async def _keep(self, child: Child) -> None:
        backoff = FIRST_BACKOFF
        while not self.stopping:
            began = time.monotonic()
            code = await self._run_once(child)
            if self.stopping:
                return
            if code == CONFIGURATION_EXIT and not child.ever_ready:
                log.error("worker process refused its configuration; stopping",
                          worker=child.name, exit_code=code)
                self.exit_code = CONFIGURATION_EXIT
                self.stop()
                return
            if time.monotonic() - began >= HEALTHY_LIFETIME:
                backoff = FIRST_BACKOFF
            log.warning("worker process exited; restarting", worker=child.name,
                        exit_code=code, restart_in_seconds=backoff)
            with anyio.move_on_after(backoff):
                await self._stopped.wait()
            backoff = min(backoff * 2, MAX_BACKOFF)
            child.restarts += 1

    async def _run_once(self, child: Child) -> int:
        ours, theirs = socket.socketpair()
        try:
            child.process = await anyio.open_process(
                self.argv(child, theirs.fileno()), pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=None, stderr=None, start_new_session=True,
                env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
            )
        except OSError as exc:
            ours.close()
            log.error("cannot start a worker process", worker=child.name, error=str(exc))
            return -1
        finally:
            theirs.close()
        log.info("worker process started", worker=child.name, pid=child.process.pid,
                 limit=child.limit)
        if self.stopping:  # a signal arrived while it was being spawned
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        async with await anyio.abc.UNIXSocketStream.from_socket(ours) as link:
            try:
                line = await _first_line(link)
                if line.strip().isdigit():
                    child.health_port = int(line)
                    child.ever_ready = True
                code = await child.process.wait()
            finally:
                child.health_port = None
        return code

    async def _notify_systemd(self) -> None:
        from mq_worker.supervisor_health import all_ready

        while True:
            if await all_ready(self.children):
                sd_notify.notify("READY=1", f"STATUS={len(self.children)} worker processes")
                return
            await anyio.sleep(0.5)

