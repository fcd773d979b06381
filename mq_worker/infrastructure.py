"""Process infrastructure: start a run's process, wait for it, stream its output.

Each run gets its own process group, so a cancel reaches everything the run
started (stopping a run: process_stop.py). Exits are noticed through a pidfd as
they happen (no polling, no thread per child). A guardian process
(guardian.py) terminates the worker's runs if the worker itself dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import anyio
import anyio.abc

from mq_worker.errors import InfrastructureNotAvailable, InfrastructureNotFound
from mq_worker.guardian import Guardian
from mq_worker.process_stop import stop_leftovers, terminate
from mq_worker.spawn import RunProcess, spawn

__all__ = ["Guardian", "OutputReader", "ProcessHandle", "read_output", "start_process",
           "stop_leftovers", "stream_output", "terminate"]

_HAS_PIDFD = hasattr(os, "pidfd_open")
# How long output may still arrive after the process exited (a background child
# may hold the pipe open forever).
_OUTPUT_DRAIN_SECONDS = 1.0


@dataclass
class ProcessHandle:
    """A started run process."""

    popen: RunProcess
    started_at: float = field(default_factory=time.time)
    signalled: bool = False
    exit_seen: bool = False  # `wait` has seen the process exit
    # Made only for a waiter (stopping, output): each event costs a backend look-up.
    _exited: anyio.Event | None = None
    # The most a grace period may still last, once the worker was told to stop at once.
    _hurried: float | None = None
    _graces: list[anyio.CancelScope] = field(default_factory=list)
    _on_exit: list[Callable[[], None]] = field(default_factory=list)

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call `callback` (it must not block) when `wait` sees the process exit."""
        self._on_exit.append(callback)

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

    async def exited(self) -> None:
        """Wait until `wait` has seen the process exit."""
        if self._exited is None:
            self._exited = anyio.Event()
            if self.exit_seen:
                self._exited.set()
        await self._exited.wait()

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
                    await _readable(fd)
                finally:
                    os.close(fd)
                self.popen.wait()
            elif fd == -1 and _HAS_PIDFD:
                self.popen.wait()
            else:
                await anyio.to_thread.run_sync(self.popen.wait, abandon_on_cancel=True)
        self.exit_seen = True
        if self._exited is not None:
            self._exited.set()
        for callback in self._on_exit:
            callback()
        self._on_exit.clear()
        assert self.popen.returncode is not None
        return self.popen.returncode

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


async def _readable(fd: int) -> None:
    """Wait until `fd` is readable: what `anyio.wait_readable` does, without its look-ups
    of the async backend and the task's read registry (~13 -> ~10 µs a wait, once per run)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    registered = True

    def _on_readable() -> None:
        # At once, as anyio does: a descriptor left registered is reported again on
        # every loop turn until the waiting task resumes.
        nonlocal registered
        registered = False
        loop.remove_reader(fd)
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, _on_readable)
    try:
        await ready
    finally:
        # Cancelled while waiting (which cancels `ready` too): the descriptor is closed
        # next, and a registration left behind would hide the next one of its number.
        if registered:
            loop.remove_reader(fd)


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
    return ProcessHandle(spawn(argv, env=env, cwd=cwd, capture_output=capture_output,
                               executable=executable))


async def stream_output(
    handle: ProcessHandle, logger: Any, on_line: Callable[[str, str], None] | None = None
) -> None:
    """Log every line the process writes, until its pipes close or soon after it exits.

    `on_line(stream, text)` also gets each line; it must not block.
    """
    reader = read_output(handle, logger, on_line)
    try:
        await reader.closed()
    finally:
        reader.close()


def read_output(handle: ProcessHandle, logger: Any,
                on_line: Callable[[str, str], None] | None = None) -> OutputReader:
    """Start reading the process's pipes at once, in the loop's reader callbacks."""
    return OutputReader(handle, logger, on_line)


_MAX_LINE_BYTES = 65536


class OutputReader:
    """A run's stdout and stderr, read in the loop's add_reader callbacks as they come.

    No task per pipe: a run that writes nothing costs two registrations and two empty
    reads. Reading ends at each pipe's end of file or, once the process has exited,
    after _OUTPUT_DRAIN_SECONDS without output (a child it left may hold a pipe open).
    """

    def __init__(self, handle: ProcessHandle, logger: Any,
                 on_line: Callable[[str, str], None] | None) -> None:
        self._logger = logger
        self._on_line = on_line
        self._loop = asyncio.get_running_loop()
        self._pipes: dict[int, tuple[IO[bytes], str]] = {}
        self._pending: dict[int, bytes] = {}
        self._done = self._loop.create_future()
        self._drain: asyncio.TimerHandle | None = None
        self._last_read = 0.0  # loop time of the last output read after the exit
        pipes = ((handle.popen.stdout, "stdout"), (handle.popen.stderr, "stderr"))
        try:
            for pipe, name in pipes:
                if pipe is not None:
                    fd = pipe.fileno()
                    os.set_blocking(fd, False)
                    self._pipes[fd] = (pipe, name)
                    self._pending[fd] = b""
                    self._loop.add_reader(fd, self._readable, fd)
        except BaseException:
            self.close()
            for pipe, _ in pipes:
                if pipe is not None:
                    pipe.close()
            raise
        if not self._pipes:
            self._done.set_result(None)
        elif handle.exit_seen:
            self._exited()
        else:
            handle.on_exit(self._exited)

    async def closed(self) -> None:
        """Wait until every pipe is read to its end (or given up on)."""
        await asyncio.shield(self._done)

    def close(self) -> None:
        """Stop reading: the partial lines are shipped, the pipes closed."""
        if self._drain is not None:
            self._drain.cancel()
        for fd in list(self._pipes):
            self._end(fd)

    def _exited(self) -> None:
        if self._pipes and self._drain is None:
            self._last_read = self._loop.time()
            self._drain = self._loop.call_later(_OUTPUT_DRAIN_SECONDS, self._drained)

    def _drained(self) -> None:
        """No output for _OUTPUT_DRAIN_SECONDS since the exit or the last read: stop."""
        left = self._last_read + _OUTPUT_DRAIN_SECONDS - self._loop.time()
        if left > 0:
            self._drain = self._loop.call_later(left, self._drained)
        else:
            self.close()

    def _readable(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._end(fd)
            return
        if self._drain is not None:  # output after the exit: wait another while
            self._last_read = self._loop.time()
        *lines, pending = (self._pending[fd] + chunk).split(b"\n")
        if len(pending) >= _MAX_LINE_BYTES:  # output without newlines must not grow memory
            lines.append(pending)
            pending = b""
        self._pending[fd] = pending
        name = self._pipes[fd][1]
        for line in lines:
            self._ship(name, line.decode(errors="replace").rstrip("\r"))

    def _end(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        pipe, name = self._pipes.pop(fd)
        pending = self._pending.pop(fd)
        try:
            if pending:
                self._ship(name, pending.decode(errors="replace"))
        finally:
            pipe.close()
            if not self._pipes:
                if self._drain is not None:
                    self._drain.cancel()
                if not self._done.done():
                    self._done.set_result(None)

    def _ship(self, name: str, text: str) -> None:
        # Never raises: in a reader callback, an error would cost the chunk's other lines.
        try:
            self._logger.info("run output", line=text, stream=name)
            if self._on_line is not None:
                self._on_line(name, text)
        except Exception as exc:
            self._loop.call_exception_handler({
                "message": "a run's output line could not be logged or shipped",
                "exception": exc})
