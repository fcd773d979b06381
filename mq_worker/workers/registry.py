"""Worker types: found by name through the `mq_worker.workers` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from mq_worker.errors import ConfigurationError

if TYPE_CHECKING:
    from mq_worker.workers.base import BaseWorker

ENTRY_POINT_GROUP = "mq_worker.workers"


def worker_class_from_type(worker_type: str) -> type[BaseWorker] | None:
    """The worker class registered for `worker_type`, or None."""
    from mq_worker.workers.base import BaseWorker  # the registry sits below the base class

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name == worker_type:
            cls: Any = entry_point.load()
            if not (isinstance(cls, type) and issubclass(cls, BaseWorker)):
                raise ConfigurationError(f"{entry_point.value} is not a BaseWorker")
            return cls
    return None


def available_worker_types() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def worker_class(worker_type: str) -> type[BaseWorker]:
    """The worker class registered for `worker_type`; ConfigurationError naming the known ones."""
    cls = worker_class_from_type(worker_type)
    if cls is None:
        raise ConfigurationError(
            f"unknown worker type {worker_type!r}; available: "
            + ", ".join(available_worker_types())
        )
    return cls
