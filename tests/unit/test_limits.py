"""Limit targets, resizing and token validity, without a broker."""

from __future__ import annotations

import pytest

from mq_worker.errors import ConfigurationError
from mq_worker.limits import ControlState, check_target, resize, run_targets
from mq_worker.messages import parse_run


def test_a_run_counts_against_its_pool_queue_deployment_tags_and_concurrency_key() -> None:
    run = parse_run(b'{"id": "6f0f3a40-3c4f-4b8e-9d64-1f3e6a9b1c20", "tags": ["a", "b"],'
                    b' "deployment": {"id": "d-7"}, "concurrency_key": "db"}')
    assert run_targets(run, "etl", "low") == [
        "pool:etl", "queue:etl/low", "key:deployment:d-7", "key:tag:a", "key:tag:b", "key:db"]
    state = ControlState()
    assert state.limited(run_targets(run, "etl", "low")) == []


@pytest.mark.parametrize("target", ["pool:", "queue:etl", "queue:a/b/c", "key:", "x:y", "pool:a.b"])
def test_malformed_targets_are_refused(target: str) -> None:
    with pytest.raises(ConfigurationError):
        check_target(target)


def test_growing_creates_only_new_numbers_and_shrinking_invalidates_the_high_ones() -> None:
    five, created = resize(None, "pool:etl", 5, version=1)
    assert list(created) == [0, 1, 2, 3, 4]
    assert all(five.valid(n, 1) for n in range(5)) and not five.valid(5, 1)
    three, created = resize(five, "pool:etl", 3, version=2)
    assert list(created) == []
    assert three.valid(2, 1) and not three.valid(3, 1) and not three.valid(4, 1)
    # Growing again re-creates 3 and 4 under a new version: a token 3 or 4 of version 1,
    # still held by a run from before the shrink, is destroyed when it comes back.
    six, created = resize(three, "pool:etl", 6, version=3)
    assert list(created) == [3, 4, 5]
    assert six.valid(2, 1) and six.valid(3, 3) and not six.valid(3, 1)
    assert six.newest_version == 3


def test_a_limit_outside_its_range_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        resize(None, "pool:etl", -1, version=1)
