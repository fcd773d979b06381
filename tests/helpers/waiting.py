"""Waiting for a condition outside the test's control."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import anyio


async def wait_until(condition: Callable[[], Any], timeout: float = 15,
                     interval: float = 0.05) -> Any:
    """Poll an outside condition (a file, the broker's state) until it holds; `condition`
    may return an awaitable (`lambda: queue_exists(url, name)`), awaited each time."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await anyio.sleep(interval)
