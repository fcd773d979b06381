"""The exceptions mq_worker raises.

    MqWorkerError
    ├── ConfigurationError       bad settings, job template or worker type
    ├── BrokerError              the broker could not be reached or refused an operation
    │   ├── TopologyMismatch     a queue exists with other arguments than ours
    │   └── PublishError         a publish was not confirmed
    │       └── UnroutableError  no queue is bound for the routing key
    ├── InvalidMessage           a run or cancel message that cannot be accepted
    └── InfrastructureError      starting or stopping a run's infrastructure failed
        ├── InfrastructureNotFound      it is already gone
        └── InfrastructureNotAvailable  this worker cannot reach it
"""

from __future__ import annotations

from uuid import UUID


class MqWorkerError(Exception):
    """Base class of every error raised by mq_worker."""


class ConfigurationError(MqWorkerError, ValueError):
    """Settings, a job template or a worker type are invalid."""


class BrokerError(MqWorkerError):
    """The broker could not be reached or refused an operation."""


class TopologyMismatch(BrokerError):
    """A queue or exchange exists with arguments other than the ones mq_worker declares."""


class PublishError(BrokerError):
    """The broker did not confirm a publish."""


class UnroutableError(PublishError):
    """The broker returned a mandatory publish: no queue is bound for its routing key."""


class InvalidMessage(MqWorkerError):
    """A message that a worker rejects; `reason` says why in one line."""

    def __init__(self, reason: str, *, run_id: UUID | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.run_id = run_id


class InfrastructureError(MqWorkerError):
    """Starting, watching or stopping a run's infrastructure failed."""


class InfrastructureNotFound(InfrastructureError):
    """The infrastructure to stop no longer exists."""


class InfrastructureNotAvailable(InfrastructureError):
    """The infrastructure exists but this worker cannot act on it (another host, no permission)."""
