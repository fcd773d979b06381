"""Pause and limit targets, and the control state every worker folds from the control stream.

A target names what a pause or a limit applies to:

    pool:<pool>                 every run of a pool
    queue:<pool>/<queue>        every run of one work queue
    key:<key>                   every run carrying the key: deployment:<id>, tag:<tag>,
                                or the run's own `concurrency_key`

A limit of N has N slot tokens, numbered 0..N-1; each token also carries the
version of the `limit set` that created it. Growing a limit creates only the
new numbers, under a new version; shrinking it makes the numbers >= N invalid.
A token is valid while its number is below N and its version is the one the
state records for that number, so a token left over from an earlier, larger
limit (still held by a run when the limit shrank) is destroyed when it comes
back instead of doubling a number created again later.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mq_worker.errors import ConfigurationError

if TYPE_CHECKING:
    from mq_worker.messages import RunMessage

_NAME = r"[A-Za-z0-9_-]{1,64}"
_POOL = re.compile(rf"^pool:({_NAME})$")
_QUEUE = re.compile(rf"^queue:({_NAME})/({_NAME})$")
_KEY = re.compile(r"^key:[^\x00-\x1f]{1,512}$")
MAX_LIMIT = 100_000


def check_target(target: str) -> str:
    """Return `target` if it is a valid pause or limit target, else raise ConfigurationError."""
    if _POOL.fullmatch(target) or _QUEUE.fullmatch(target) or _KEY.fullmatch(target):
        return target
    raise ConfigurationError(
        f"invalid target {target!r}: use pool:<pool>, queue:<pool>/<queue> or key:<key>"
    )


def check_pause_target(target: str) -> str:
    check_target(target)
    if target.startswith("key:"):
        raise ConfigurationError(f"invalid pause target {target!r}: only a pool or a queue "
                                 "can be paused (pool:<pool>, queue:<pool>/<queue>)")
    return target


def pool_target(pool: str) -> str:
    return f"pool:{pool}"


def queue_target(pool: str, queue: str) -> str:
    return f"queue:{pool}/{queue}"


def run_targets(run: RunMessage, pool: str, queue: str) -> list[str]:
    """Every target a run counts against, whether or not a limit is set on it."""
    targets = [pool_target(pool), queue_target(pool, queue)]
    if run.deployment is not None and run.deployment.id:
        targets.append(f"key:deployment:{run.deployment.id}")
    targets.extend(f"key:tag:{tag}" for tag in run.tags)
    if run.concurrency_key:
        targets.append(f"key:{run.concurrency_key}")
    return targets


@dataclass(frozen=True)
class Limit:
    """A limit as the control stream last set it."""

    target: str
    limit: int
    # (first number, last number + 1, version): which version each token number has.
    ranges: tuple[tuple[int, int, int], ...]

    def valid(self, number: int, version: int) -> bool:
        if number >= self.limit:
            return False
        for first, end, created in self.ranges:
            if first <= number < end:
                return created == version
        return False

    @property
    def newest_version(self) -> int:
        return max((created for _, _, created in self.ranges), default=0)


def resize(current: Limit | None, target: str, limit: int, version: int) -> tuple[Limit, range]:
    """The limit after `limit set target limit`, and the token numbers to create."""
    if not 0 <= limit <= MAX_LIMIT:
        raise ConfigurationError(f"a limit is between 0 and {MAX_LIMIT}")
    kept: list[tuple[int, int, int]] = []
    have = 0
    if current is not None:
        for first, end, created in current.ranges:
            end = min(end, limit, current.limit)
            if first < end:
                kept.append((first, end, created))
                have = max(have, end)
    new = range(have, limit)
    if new:
        kept.append((new.start, new.stop, version))
    return Limit(target, limit, tuple(kept)), new


@dataclass
class ControlState:
    """What the control stream says now: paused targets and limits."""

    paused: set[str] = field(default_factory=set)
    limits: dict[str, Limit] = field(default_factory=dict)

    def limited(self, targets: Iterable[str]) -> list[str]:
        """Those of `targets` that have a limit, in one global order (no lock-order cycles)."""
        limits = self.limits
        return sorted({t for t in targets if t in limits})

    def paused_queues(self, pool: str, queues: Iterable[str]) -> set[str]:
        """The queues of `pool` that take no runs now."""
        if pool_target(pool) in self.paused:
            return set(queues)
        return {q for q in queues if queue_target(pool, q) in self.paused}
