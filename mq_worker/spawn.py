"""Starting a run's process, in a process group of its own, never through a shell.

A run whose executable path is known (an absolute or relative path, or the file
an allow-list admitted) and that starts in the worker's directory is started
with posix_spawn: glibc's vfork-like clone, no error pipe, and none of
subprocess.Popen's Python work, about half the CPU a start costs the worker.
Other runs (a working directory of their own, a command looked up on PATH)
start with subprocess.Popen. Both give the run the same start: /dev/null or
pipes as stdin/stdout/stderr, no other descriptor of the worker, SIGPIPE and
SIGXFSZ back at their defaults (Python ignores SIGPIPE).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, Protocol

_CLOSE_RANGE_CLOEXEC = 4
# Signals Python ignores that a run must get back at their defaults (as Popen does).
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class RunProcess(Protocol):
    """What the worker uses of a started process: subprocess.Popen's names."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def stdout(self) -> IO[bytes] | None: ...

    @property
    def stderr(self) -> IO[bytes] | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class SpawnedProcess:
    """A process started with posix_spawn, waited for as subprocess.Popen waits."""

    def __init__(self, pid: int, stdout: IO[bytes] | None, stderr: IO[bytes] | None) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        """Reap the process (blocking: callers wait for its pidfd first) and return its
        exit code, negative for a signal. `timeout` is accepted for Popen's signature."""
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped elsewhere; Popen reports 0 too
                self.returncode = 0
        return self.returncode


def _close_on_exec_all() -> bool:
    """Mark every descriptor above 2 close-on-exec (one close_range(2) call), so a
    spawned run inherits none; False where the C library or kernel lacks it."""
    function = getattr(_LIBC, "close_range", None)
    if function is None:
        return False
    return bool(function(3, ctypes.c_uint(-1), _CLOSE_RANGE_CLOEXEC) == 0)


_LIBC = ctypes.CDLL(None, use_errno=True)
_CAN_SPAWN = hasattr(os, "posix_spawn") and _close_on_exec_all()
_DEVNULL: int | None = None


def _devnull() -> int:
    """/dev/null opened once (close-on-exec), given to every run as its stdin:
    subprocess.DEVNULL opens and closes it again for each spawn."""
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _DEVNULL


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    capture_output: bool,
    executable: str | None = None,
) -> RunProcess:
    """Start `argv` in a new process group; raise OSError when it cannot start."""
    path = executable or (argv[0] if os.sep in argv[0] else None)
    if _CAN_SPAWN and cwd is None and path is not None:
        return _posix_spawn(path, argv, env, capture_output)
    devnull = _devnull()
    output = subprocess.PIPE if capture_output else devnull
    return subprocess.Popen(
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


def _posix_spawn(path: str, argv: Sequence[str], env: Mapping[str, str],
                 capture_output: bool) -> SpawnedProcess:
    devnull = _devnull()
    ours: list[int] = []
    theirs: list[int] = []
    if capture_output:
        for _ in range(2):
            reader, writer = os.pipe()
            ours.append(reader)
            theirs.append(writer)
    outputs = theirs or [devnull, devnull]
    actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, outputs[0], 1),
               (os.POSIX_SPAWN_DUP2, outputs[1], 2)]
    try:
        _close_on_exec_all()  # a descriptor a library made inheritable since the last spawn
        pid = os.posix_spawn(path, list(argv), env, file_actions=actions, setpgroup=0,
                             setsigdef=_DEFAULT_SIGNALS)
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    if not ours:
        return SpawnedProcess(pid, None, None)
    return SpawnedProcess(pid, os.fdopen(ours[0], "rb"), os.fdopen(ours[1], "rb"))
