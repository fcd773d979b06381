"""Operating-system resources a worker needs to start runs: descriptors, memory, processes.

Running out of them at spawn (EMFILE, ENFILE, ENOMEM, EAGAIN) says nothing about
the run: it is given back to the broker and the worker takes no new run for a
while, instead of ending the run as crashed and draining its queue into crashed
runs.
"""

from __future__ import annotations

import errno
import resource

import structlog

log = structlog.get_logger("mq_worker.resources")

TRANSIENT_SPAWN_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN})
# Without a hard limit, raise the soft one this far (a worker's needs grow with its runs).
_UNLIMITED_TARGET = 1 << 20


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft limit on open descriptors to the hard one; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the limit on open descriptors", soft=soft, hard=hard,
                        error=str(exc))
            return soft, soft
        return soft, target
    return soft, soft


def is_transient_spawn_error(exc: BaseException) -> bool:
    """True for a failure to start a process that comes from exhausted resources."""
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_SPAWN_ERRNOS


class SpawnBackoff:
    """How long intake pauses after a transient spawn failure: 1 s, doubling to 30 s."""

    def __init__(self, first: float = 1.0, longest: float = 30.0) -> None:
        self._first = first
        self._longest = longest
        self._next = first

    def failed(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self._longest)
        return delay

    def succeeded(self) -> None:
        self._next = self._first
