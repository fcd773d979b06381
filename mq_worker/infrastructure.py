"""Process infrastructure: start a run's process, stream its output, wait for it, stop it.

Each run gets its own process group, so a cancel reaches everything the run
started. Exits are noticed through a pidfd as they happen (no polling, no
thread per child). A guardian process terminates the worker's runs if the
worker itself dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import psutil
import structlog

from mq_worker.errors import InfrastructureNotAvailable, InfrastructureNotFound

_GUARDIAN = Path(__file__).with_name("_guardian.py")
_HAS_PIDFD = hasattr(os, "pidfd_open")
# Linux lists a thread's children in /proc when built with CONFIG_PROC_CHILDREN.
_HAS_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
# How long output may still arrive after the process exited (a background child
# may hold the pipe open forever).
_OUTPUT_DRAIN_SECONDS = 1.0
# How long the guardian may go on listing a group that has ended: a dead worker's
# guardian signals a group id that is, at worst, this stale.
_FORGET_DELAY_SECONDS = 0.5


class Guardian:
    """The process that terminates this worker's runs if the worker dies."""

    def __init__(self, grace: float = 5.0) -> None:
        self._grace = grace
        self._process: subprocess.Popen[bytes] | None = None
        self._pipe: IO[bytes] | None = None
        self._log = structlog.get_logger("mq_worker.guardian")
        self._lines: list[str] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flush_urgent = False

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_GUARDIAN), str(self._grace)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._pipe = self._process.stdin

    def watch(self, pgid: int) -> None:
        """Tell the guardian about a new process group, within this turn of the event loop."""
        self._lines.append(f"+{pgid}\n")
        self._schedule_flush(0.0)

    def forget(self, pgid: int) -> None:
        """Tell the guardian a group is gone; not urgent, so batched with later lines."""
        self._lines.append(f"-{pgid}\n")
        self._schedule_flush(_FORGET_DELAY_SECONDS)

    def _schedule_flush(self, delay: float) -> None:
        # Each write wakes the guardian's process: write what a loop turn produced at once.
        if self._flush_handle is not None and (delay > 0 or self._flush_urgent):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_urgent = delay == 0
        self._flush_handle = (loop.call_soon(self.flush) if delay == 0
                              else loop.call_later(delay, self.flush))

    def flush(self) -> None:
        """Write the lines waiting for the guardian."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        lines, self._lines = self._lines, []
        if self._pipe is None or not lines:
            return
        try:
            self._pipe.write("".join(lines).encode())
            self._pipe.flush()
        except OSError:
            self._log.error("the guardian process is gone: "
                            "runs would outlive a crash of this worker")
            self._pipe = None

    def stop(self) -> None:
        """Stop the guardian; groups still listed are terminated as if the worker died."""
        self.flush()
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.close()
            self._pipe = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=self._grace + 5)
            self._process = None


@dataclass
class ProcessHandle:
    """A started run process."""

    popen: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.time)
    signalled: bool = False
    _exited: anyio.Event = field(default_factory=anyio.Event)
    # The most a grace period may still last, once the worker was told to stop at once.
    _hurried: float | None = None
    _graces: list[anyio.CancelScope] = field(default_factory=list)

    def hurry(self, longest: float) -> None:
        """Shorten the grace this run gets before SIGKILL, now and later, to `longest` seconds."""
        self._hurried = longest if self._hurried is None else min(self._hurried, longest)
        for scope in self._graces:
            scope.deadline = min(scope.deadline, anyio.current_time() + longest)

    @contextlib.contextmanager
    def grace(self, seconds: float) -> Iterator[anyio.CancelScope]:
        """A cancel scope that ends after `seconds`, or sooner if the run is hurried."""
        if self._hurried is not None:
            seconds = min(seconds, self._hurried)
        with anyio.CancelScope(deadline=anyio.current_time() + seconds) as scope:
            self._graces.append(scope)
            try:
                yield scope
            finally:
                self._graces.remove(scope)

    def group_alive(self) -> bool:
        """True while any process is left in the run's process group."""
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        """Wait for the process to exit; return its exit code (negative: killed by a signal)."""
        if self.popen.returncode is None:
            fd = -1
            if _HAS_PIDFD:
                try:
                    fd = os.pidfd_open(self.popen.pid)
                except ProcessLookupError:
                    fd = -1
                except OSError:  # no descriptor left (EMFILE): wait in a thread instead
                    fd = -2
            if fd >= 0:
                try:
                    await anyio.wait_readable(fd)
                finally:
                    os.close(fd)
                self.popen.wait()
            elif fd == -1 and _HAS_PIDFD:
                self.popen.wait()
            else:
                await anyio.to_thread.run_sync(self.popen.wait, abandon_on_cancel=True)
        self._exited.set()
        assert self.popen.returncode is not None
        return self.popen.returncode

    def descendants(self) -> list[psutil.Process]:
        if _HAS_PROC_CHILDREN:
            processes = []
            for pid in _descendant_pids(self.pid):
                with contextlib.suppress(psutil.Error):
                    processes.append(psutil.Process(pid))
            return processes
        try:
            children: list[psutil.Process] = psutil.Process(self.pid).children(recursive=True)
            return children
        except psutil.Error:
            return []

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the run's process group; raise InfrastructureNotFound if it is gone."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            raise InfrastructureNotFound(f"process group {self.pid} no longer exists") from None
        except PermissionError as exc:
            raise InfrastructureNotAvailable(
                f"not allowed to signal process group {self.pid}: {exc}"
            ) from None
        self.signalled = True


_DEVNULL: int | None = None


def _devnull() -> int:
    """/dev/null opened once (close-on-exec), given to every run as its stdin:
    subprocess.DEVNULL opens and closes it again for each spawn."""
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _DEVNULL


def start_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    capture_output: bool,
    executable: str | None = None,
) -> ProcessHandle:
    """Start `argv` (never through a shell) in a new process group.

    With `executable` (an absolute path), exactly that file is executed, with no
    PATH search. Raises OSError when it cannot start: a missing executable, a bad
    working directory.
    """
    devnull = _devnull()
    output = subprocess.PIPE if capture_output else devnull
    popen = subprocess.Popen(
        list(argv),
        executable=executable,
        env=dict(env),
        cwd=cwd,
        stdin=devnull,
        stdout=output,
        stderr=output,
        close_fds=True,
        process_group=0,
    )
    return ProcessHandle(popen)


async def stream_output(
    handle: ProcessHandle, logger: Any, on_line: Callable[[str, str], None] | None = None
) -> None:
    """Log every line the process writes, until its pipes close or soon after it exits.

    `on_line(stream, text)` also gets each line; it must not block.
    """
    pipes = [(p, name) for p, name in ((handle.popen.stdout, "stdout"),
                                       (handle.popen.stderr, "stderr")) if p is not None]
    if not pipes:
        return
    async with anyio.create_task_group() as tg:
        for pipe, name in pipes:
            tg.start_soon(_pump, pipe, name, logger, handle, on_line)


_MAX_LINE_BYTES = 65536


async def _pump(pipe: IO[bytes], name: str, logger: Any, handle: ProcessHandle,
                on_line: Callable[[str, str], None] | None) -> None:
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    pending = b""
    try:
        while True:
            if handle._exited.is_set():
                with anyio.move_on_after(_OUTPUT_DRAIN_SECONDS) as scope:
                    await anyio.wait_readable(fd)
                if scope.cancelled_caught:
                    break
            else:
                async with anyio.create_task_group() as race:
                    async def _until_exit() -> None:
                        await handle._exited.wait()
                        race.cancel_scope.cancel()

                    async def _until_readable() -> None:
                        await anyio.wait_readable(fd)
                        race.cancel_scope.cancel()

                    race.start_soon(_until_exit)
                    race.start_soon(_until_readable)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) >= _MAX_LINE_BYTES:  # output without newlines must not grow memory
                lines.append(pending)
                pending = b""
            for line in lines:
                text = line.decode(errors="replace").rstrip("\r")
                logger.info("run output", line=text, stream=name)
                if on_line is not None:
                    on_line(name, text)
    finally:
        if pending:
            text = pending.decode(errors="replace")
            logger.info("run output", line=text, stream=name)
            if on_line is not None:
                on_line(name, text)
        pipe.close()


async def terminate(handle: ProcessHandle, grace_seconds: float) -> int:
    """SIGTERM the run's process group, SIGKILL what is left after `grace_seconds`.

    The run's descendants are listed first, so those that left its process group
    (setsid, setpgid) are stopped too. Returns the run's exit code. Raises
    InfrastructureNotFound if the run was already gone, InfrastructureNotAvailable
    if it cannot be signalled or survives SIGKILL.
    """
    tree = handle.descendants()
    strays = [p for p in tree if _pgid(p) not in (None, handle.pid)]
    handle.signal_group(signal.SIGTERM)
    _signal_each(strays, signal.SIGTERM)
    with handle.grace(grace_seconds) as graceful:
        await _all_exited(handle, tree)
    if graceful.cancelled_caught:
        with contextlib.suppress(InfrastructureNotFound):
            handle.signal_group(signal.SIGKILL)
        _signal_each(tree, signal.SIGKILL)
        with anyio.move_on_after(5.0) as forced:
            await _all_exited(handle, tree)
        if forced.cancelled_caught:
            raise InfrastructureNotAvailable(
                f"process group {handle.pid} still has processes 5 s after SIGKILL"
            )
    assert handle.returncode is not None
    return handle.returncode


async def stop_leftovers(handle: ProcessHandle, grace_seconds: float) -> bool:
    """After the run's main process exited, stop what is left of its process group.

    Background processes (`cmd &`) would otherwise outlive the run, its cancel and
    the worker's limit. They get SIGTERM, then SIGKILL after `grace_seconds`.
    Returns True if the group is empty afterwards.
    """
    _reap_group(handle.pid)
    if not handle.group_alive():
        return True
    with contextlib.suppress(InfrastructureNotFound, InfrastructureNotAvailable):
        handle.signal_group(signal.SIGTERM)
    with handle.grace(grace_seconds):
        await _group_empty(handle)
    if handle.group_alive():
        with contextlib.suppress(InfrastructureNotFound, InfrastructureNotAvailable):
            handle.signal_group(signal.SIGKILL)
        with anyio.move_on_after(5.0):
            await _group_empty(handle)
    return not handle.group_alive()


async def _group_empty(handle: ProcessHandle) -> None:
    # A process group has no descriptor to wait on; its members are not our children.
    while True:
        _reap_group(handle.pid)
        if not handle.group_alive():
            return
        await anyio.sleep(0.05)


def _reap_group(pgid: int) -> None:
    """Reap the group's processes that ended as children of this process.

    When the worker is PID 1 (a container without an init), orphaned processes
    of runs become its children: unreaped, they would keep the group alive.
    Called only once the run's main process has been reaped.
    """
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-pgid, os.WNOHANG)[0] != 0:
            pass


def _descendant_pids(pid: int) -> list[int]:
    """Descendants of `pid` from /proc/<pid>/task/*/children: no scan of every process."""
    found: list[int] = []
    parents = [pid]
    while parents:
        parent = parents.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for thread in threads:
            try:
                with open(f"/proc/{parent}/task/{thread}/children") as children:
                    pids = [int(p) for p in children.read().split()]
            except OSError:
                continue
            found.extend(pids)
            parents.extend(pids)
    return found


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except ProcessLookupError:
        return None


def _signal_each(processes: list[psutil.Process], sig: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)


async def _all_exited(handle: ProcessHandle, tree: list[psutil.Process]) -> None:
    await handle._exited.wait()
    for process in tree:
        await _exited(process)


async def _exited(process: psutil.Process) -> None:
    """Wait until `process` (not necessarily our child) has terminated."""
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return
    try:
        # is_running() compares start times: the pid may meanwhile belong to another process.
        if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
            await anyio.wait_readable(fd)
    except psutil.Error:
        pass
    finally:
        os.close(fd)
