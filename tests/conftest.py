"""Fixtures only: a vhost of its own on the real broker for every test, event logs, workers.

Every test gets a fresh vhost (created through the management API, deleted
afterwards), so the fixed names of the wire contract never collide between
tests. Nothing here mocks the broker; the helpers live in tests/helpers/.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from mq_worker import logs
from mq_worker.testing import EventLog, VHost, event_log
from tests.helpers.broker import BROKER
from tests.helpers.workers import WorkerProcess

logs.configure("console", os.environ.get("MQ_WORKER_TEST_LOG_LEVEL", "WARNING"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def vhost() -> Iterator[VHost]:
    with BROKER.throwaway_vhost("t") as own:
        yield own


@pytest.fixture
async def events(vhost: VHost) -> AsyncIterator[EventLog]:
    async with event_log(vhost.url) as log:
        yield log


@pytest.fixture
def worker_processes() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(url: str, *args: str, **kwargs: Any) -> WorkerProcess:
        process = WorkerProcess(url, *args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
