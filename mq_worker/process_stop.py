"""Stopping a run: its process group, and the descendants that left it.

A cancel or timeout gets SIGTERM to the run's group (and to descendants that
moved to a group or session of their own), then SIGKILL after the grace period.
Background processes a run leaves behind when its main process exits are
stopped the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import TYPE_CHECKING

import anyio
import psutil

from mq_worker.errors import InfrastructureNotAvailable, InfrastructureNotFound

if TYPE_CHECKING:
    from mq_worker.infrastructure import ProcessHandle

# Linux lists a thread's children in /proc when built with CONFIG_PROC_CHILDREN.
_HAS_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def descendants(handle: ProcessHandle) -> list[psutil.Process]:
    """Every process the run's main process started, wherever its group."""
    if _HAS_PROC_CHILDREN:
        processes = []
        for pid in _descendant_pids(handle.pid):
            with contextlib.suppress(psutil.Error):
                processes.append(psutil.Process(pid))
        return processes
    try:
        children: list[psutil.Process] = psutil.Process(handle.pid).children(recursive=True)
        return children
    except psutil.Error:
        return []


async def terminate(handle: ProcessHandle, grace_seconds: float) -> int:
    """SIGTERM the run's process group, SIGKILL what is left after `grace_seconds`.

    The run's descendants are listed first, so those that left its process group
    (setsid, setpgid) are stopped too. Returns the run's exit code. Raises
    InfrastructureNotFound if the run was already gone, InfrastructureNotAvailable
    if it cannot be signalled or survives SIGKILL.
    """
    tree = descendants(handle)
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
    await handle.exited()
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
