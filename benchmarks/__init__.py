"""Benchmarks of mq_worker (see docs/benchmarks.md); not part of the test suite."""
