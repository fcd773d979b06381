"""A run's counts through the per-queue children are the labelled series Prometheus scrapes."""

from __future__ import annotations

from mq_worker.metrics import WorkerMetrics


def test_counts_through_a_queues_children_are_its_labelled_series() -> None:
    metrics = WorkerMetrics("pool-a", ["q1", "q2"])
    metrics.of("pool-a", "q1").started.inc()
    metrics.of("pool-a", "q1").started.inc()
    metrics.of("pool-a", "q2").completed.inc()
    metrics.of("pool-a", "q1").duration.observe(0.2)
    text = metrics.render().decode()
    assert 'mq_worker_runs_started_total{pool="pool-a",queue="q1"} 2.0' in text
    assert 'mq_worker_runs_started_total{pool="pool-a",queue="q2"} 0.0' in text
    assert 'mq_worker_runs_completed_total{pool="pool-a",queue="q2"} 1.0' in text
    assert 'mq_worker_run_duration_seconds_count{pool="pool-a",queue="q1"} 1.0' in text
    assert metrics.of("pool-a", "q1").started is metrics.started.labels("pool-a", "q1")
