"""The output shipper at a worker's stop, without a broker: `flush` waits for the queued
batches, `abandon` drops what could not be shipped and counts its lines."""

from __future__ import annotations

import anyio
import pytest
from prometheus_client import CollectorRegistry

from mq_worker.output import OutputShipper

pytestmark = pytest.mark.anyio


async def test_a_flush_without_a_broker_waits_and_abandoned_output_is_counted_dropped() -> None:
    registry = CollectorRegistry()
    shipper = OutputShipper(pool="p", worker="w", registry=registry)
    run = shipper.open("r1", "default")
    for i in range(3):
        run.line("stdout", f"line {i}")
    run.close()  # the lines' batch and the eof batch are queued
    assert shipper.stats().pending_bytes > 0
    with anyio.move_on_after(0.1) as waited:
        await shipper.flush()
    assert waited.cancelled_caught  # nothing ships them: the flush waits (its caller bounds it)
    assert shipper.abandon() == (1, 3)
    assert shipper.stats().dropped_lines == 3 and shipper.stats().pending_bytes == 0
    assert registry.get_sample_value("mq_worker_output_lines_total",
                                     {"outcome": "dropped"}) == 3
    with anyio.fail_after(5):
        await shipper.flush()  # nothing queued: returns at once
    assert shipper.abandon() == (0, 0)
