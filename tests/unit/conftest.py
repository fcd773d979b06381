"""Fixtures of the unit layer: none that reaches a broker.

Asking for the broker's fixtures here fails at once, so a test that needs RabbitMQ is
written in tests/, where they live, and this layer keeps running without any service.
"""

from __future__ import annotations

from typing import NoReturn

import pytest


def _no_broker(name: str) -> NoReturn:
    pytest.fail(f"the `{name}` fixture needs RabbitMQ: a test using it belongs in tests/, "
                "not tests/unit/", pytrace=False)


@pytest.fixture
def vhost() -> NoReturn:
    _no_broker("vhost")


@pytest.fixture
def events() -> NoReturn:
    _no_broker("events")


@pytest.fixture
def worker_processes() -> NoReturn:
    _no_broker("worker_processes")
