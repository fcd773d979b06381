"""Which spare slot tokens a worker may keep between two runs of a target (no broker)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pytest

from mq_worker import spares as spares_module
from mq_worker.spares import MIN_LIMIT, HeldToken, Spares


class Settled:
    """What a Spares gave back and destroyed (see SlotRequests.settle)."""

    def __init__(self) -> None:
        self.given_back: list[int] = []
        self.destroyed: list[int] = []

    async def __call__(self, channel: Any, give_back: list[HeldToken],
                       destroy: Collection[HeldToken]) -> None:
        self.given_back += [t.tag for t in give_back]
        self.destroyed += [t.tag for t in destroy]


def spares_of(still_valid: Any = lambda *_: True, settled: Settled | None = None) -> Spares:
    return Spares(still_valid, settled or Settled())


def token(target: str = "key:db", tag: int = 1) -> HeldToken:
    return HeldToken(target, tag, number=0, version=1)


def test_nothing_is_kept_before_a_check_has_seen_the_limit_far_from_reached() -> None:
    spares = spares_of()
    assert not spares.keep(token())
    assert spares.observe("key:db", 10, free=5, waiting=0) is None
    assert spares.keep(token())
    assert spares.take("key:db") == token()._replace(spare=True)
    assert spares.take("key:db") is None


@pytest.mark.parametrize(("limit", "free", "waiting"), [
    (10, 4, 0),              # more than half in use
    (10, 9, 1),              # a run waits
    (MIN_LIMIT - 1, 3, 0),   # too small a limit to keep a slot idle
    (None, 0, 0),            # the limit was removed
])
def test_a_spare_is_given_back_when_a_check_sees_it_may_no_longer_be_kept(
    limit: int | None, free: int, waiting: int
) -> None:
    spares = spares_of()
    spares.observe("key:db", 10, free=10, waiting=0)
    assert spares.keep(token())
    assert spares.observe("key:db", limit, free=free, waiting=waiting) == token()
    assert not spares
    assert not spares.keep(token(tag=2))  # nor is the next one kept


def test_one_spare_per_target_at_most() -> None:
    spares = spares_of()
    spares.observe("key:db", 10, free=10, waiting=0)
    spares.observe("pool:etl", 10, free=10, waiting=0)
    assert spares.keep(token("key:db", 1))
    assert not spares.keep(token("key:db", 2))
    assert spares.keep(token("pool:etl", 3))
    assert sorted(spares.targets()) == ["key:db", "pool:etl"]


def test_a_spare_unused_for_a_while_is_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(spares_module.time, "monotonic", lambda: now[0])
    spares = spares_of()
    spares.observe("key:db", 10, free=10, waiting=0)
    assert spares.keep(token())
    now[0] += spares_module.IDLE_SECONDS / 2
    assert spares.observe("key:db", 10, free=9, waiting=0) is None
    now[0] += spares_module.IDLE_SECONDS
    assert spares.observe("key:db", 10, free=9, waiting=0) == token()


def test_spares_are_forgotten_with_their_channel() -> None:
    spares = spares_of()
    spares.observe("key:db", 10, free=10, waiting=0)
    assert spares.keep(token())
    spares.forget()
    assert spares.take("key:db") is None
    assert not spares.keep(token())  # a new channel: a check must see the limit again


def test_the_next_check_is_due_when_the_oldest_spare_has_stayed_unused_long_enough(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(spares_module.time, "monotonic", lambda: now[0])
    spares = spares_of()
    assert spares.idle_in() == float("inf")
    spares.observe("key:db", 10, free=10, waiting=0)
    spares.keep(token())
    now[0] += spares_module.IDLE_SECONDS / 2
    assert spares.idle_in() == pytest.approx(spares_module.IDLE_SECONDS / 2, abs=0.02)
    now[0] += spares_module.IDLE_SECONDS
    assert 0 < spares.idle_in() <= 0.02


@pytest.mark.anyio
async def test_a_spare_the_limit_no_longer_lists_is_destroyed_not_used() -> None:
    valid = {"pool:etl": True, "key:db": False}
    settled = Settled()
    spares = spares_of(lambda target, number, version: valid[target], settled)
    for target in valid:
        spares.observe(target, 10, free=10, waiting=0)
        assert spares.keep(token(target, tag=len(target)))
    tokens: list[HeldToken] = []
    needed = await spares.take_for(["key:db", "pool:etl", "queue:etl/a"], tokens,
                                   object())  # type: ignore[arg-type]
    assert needed == ["key:db", "queue:etl/a"]
    assert tokens == [token("pool:etl", tag=len("pool:etl"))._replace(spare=True)]
    assert (settled.destroyed, settled.given_back) == ([len("key:db")], [])


def test_a_token_that_came_back_with_a_lost_connection_is_not_kept() -> None:
    """Kept, it would start the next run here without the hold such a token needs."""
    spares = spares_of()
    spares.observe("key:db", 10, free=10, waiting=0)
    assert not spares.keep(token()._replace(returned=True))
    assert spares.keep(token())
