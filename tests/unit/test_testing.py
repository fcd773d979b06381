"""mq_worker.testing without a broker: which broker it addresses, and the URLs it gives."""

from __future__ import annotations

import pytest

from mq_worker.testing import LocalBroker, VHost


def test_the_local_broker_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("HOST", "PORT", "MANAGEMENT"):
        monkeypatch.delenv(f"MQ_WORKER_TEST_{variable}", raising=False)

    broker = LocalBroker.from_environment()

    assert (broker.host, broker.port, broker.management_url) == (
        "127.0.0.1", 5672, "http://127.0.0.1:15672/api")


def test_the_environment_names_another_broker_under_its_own_prefix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQ_WORKER_BENCH_HOST", "rabbit.internal")
    monkeypatch.setenv("MQ_WORKER_BENCH_PORT", "5673")
    monkeypatch.delenv("MQ_WORKER_BENCH_MANAGEMENT", raising=False)

    broker = LocalBroker.from_environment("MQ_WORKER_BENCH")

    assert (broker.host, broker.port, broker.management_url) == (
        "rabbit.internal", 5673, "http://rabbit.internal:15672/api")
    assert LocalBroker.from_environment("MQ_WORKER_OTHER").host == "127.0.0.1"


def test_a_vhost_url_quotes_the_name_and_can_name_another_user_or_port() -> None:
    vhost = VHost("t/1 2", LocalBroker(host="h", port=5672))

    assert vhost.url == "amqp://guest:guest@h:5672/t%2F1%202"
    assert vhost.url_for("reader", "pw", port=6000) == "amqp://reader:pw@h:6000/t%2F1%202"
