"""Worker types: found by name through the `mq_worker.workers` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, TypeVar

from mq_worker.errors import ConfigurationError

ENTRY_POINT_GROUP = "mq_worker.workers"

WorkerClass = TypeVar("WorkerClass")


def worker_class_from_type(worker_type: str, base: type[WorkerClass]
                           ) -> type[WorkerClass] | None:
    """The class registered for `worker_type`, or None; ConfigurationError if it is not a
    subclass of `base` (BaseWorker, which passes itself: the registry sits below it)."""
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name == worker_type:
            cls: Any = entry_point.load()
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise ConfigurationError(f"{entry_point.value} is not a {base.__name__}")
            return cls
    return None


def available_worker_types() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def worker_class(worker_type: str, base: type[WorkerClass]) -> type[WorkerClass]:
    """The class registered for `worker_type`; ConfigurationError naming the known ones."""
    cls = worker_class_from_type(worker_type, base)
    if cls is None:
        raise ConfigurationError(
            f"unknown worker type {worker_type!r}; available: "
            + ", ".join(available_worker_types())
        )
    return cls
