"""The wire contract as data: JSON Schemas of every message and the AsyncAPI 3.0 document.

Everything here is generated from the pydantic models (`mq_worker.messages`
and `mq_worker.events`), so the published contract cannot drift from what
workers parse and send. `docs/asyncapi.yaml` is `asyncapi_yaml()`.

    models      the message models and their standalone JSON Schemas
    channels    the AsyncAPI channels and operations: where each message goes
    components  the AsyncAPI messages: content types, headers, examples
    document    the whole document, and as YAML (yaml_text)
"""

from mq_worker.schema.document import asyncapi, asyncapi_yaml
from mq_worker.schema.models import (
    EVENT_TYPES,
    EventEnvelope,
    PingData,
    event_model,
    json_schema,
    json_schemas,
    schema_names,
)
from mq_worker.schema.yaml_text import to_yaml

__all__ = [
    "EVENT_TYPES",
    "EventEnvelope",
    "PingData",
    "asyncapi",
    "asyncapi_yaml",
    "event_model",
    "json_schema",
    "json_schemas",
    "schema_names",
    "to_yaml",
]
