"""mq_worker: runs an orchestrator's jobs as OS processes, pushed over RabbitMQ."""

from mq_worker.errors import (
    BrokerError,
    ConfigurationError,
    InfrastructureError,
    InfrastructureNotAvailable,
    InfrastructureNotFound,
    InvalidMessage,
    MqWorkerError,
    PublishError,
    TopologyMismatch,
    UnroutableError,
)
from mq_worker.events import Event, EventType
from mq_worker.job_configuration import BaseJobConfiguration, BaseJobTemplate
from mq_worker.messages import CancelMessage, DeploymentRef, FlowRef, RunMessage
from mq_worker.publisher import Publisher, new_run
from mq_worker.settings import WorkerSettings
from mq_worker.subscriber import EventSubscriber
from mq_worker.workers.base import BaseWorker, WorkerResult
from mq_worker.workers.process import ProcessJobConfiguration, ProcessWorker

__all__ = [
    "BaseJobConfiguration",
    "BaseJobTemplate",
    "BaseWorker",
    "BrokerError",
    "CancelMessage",
    "ConfigurationError",
    "DeploymentRef",
    "Event",
    "EventSubscriber",
    "EventType",
    "FlowRef",
    "InfrastructureError",
    "InfrastructureNotAvailable",
    "InfrastructureNotFound",
    "InvalidMessage",
    "MqWorkerError",
    "ProcessJobConfiguration",
    "ProcessWorker",
    "PublishError",
    "Publisher",
    "RunMessage",
    "TopologyMismatch",
    "UnroutableError",
    "WorkerResult",
    "WorkerSettings",
    "new_run",
]
