"""The committed AsyncAPI document as a validator of real broker messages."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
ASYNCAPI_FILE = ROOT / "docs" / "asyncapi.yaml"
ASYNCAPI_SCHEMA_FILE = Path(__file__).parent / "data" / "asyncapi-3.0.0.schema.json"


@functools.cache
def committed_document() -> dict[str, Any]:
    return dict(yaml.safe_load(ASYNCAPI_FILE.read_text()))


def _resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def message_for_routing_key(document: dict[str, Any], exchange: str, routing_key: str
                            ) -> dict[str, Any]:
    """The message the document declares for a literal routing key on `exchange`."""
    for channel in document["channels"].values():
        binding = channel["bindings"]["amqp"]["exchange"]["name"]
        if binding == exchange and channel["address"] == routing_key:
            (message,) = channel["messages"].values()
            return dict(_resolve(document, message["$ref"]))
    raise AssertionError(f"no channel for {routing_key!r} on {exchange!r} in the document")


def _rfc3339(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return "T" in value.upper() and parsed.tzinfo is not None


FORMATS = jsonschema.FormatChecker()  # uuid and the other formats jsonschema knows ...
FORMATS.checks("date-time")(_rfc3339)  # ... and RFC 3339 times, without an extra package


def payload_validator(document: dict[str, Any], message: dict[str, Any]) -> jsonschema.Validator:
    """A validator of `message`'s payload; its $refs resolve inside the document."""
    schema = {**message["payload"], "components": document["components"]}
    validator_class = jsonschema.Draft7Validator  # the AsyncAPI Schema format is draft 07 based
    return validator_class(schema, format_checker=FORMATS)


def assert_events_conform(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> set[str]:
    """Every message validates against the document's message for its routing key, and
    declares every field it carries (the document hides nothing workers send).

    Returns the event types seen.
    """
    document = committed_document()
    seen: set[str] = set()
    for raw in messages:
        assert raw.routing_key is not None
        message = message_for_routing_key(document, "mq_worker.events", raw.routing_key)
        assert raw.content_type == message["contentType"], raw.routing_key
        body = json.loads(raw.body)
        errors = sorted(payload_validator(document, message).iter_errors(body), key=str)
        assert not errors, f"{raw.routing_key}: {errors[0].message} at {list(errors[0].path)}"
        envelope = _resolve(document, message["payload"]["$ref"])
        data = _resolve(document, envelope["properties"]["data"]["$ref"])
        assert set(body) <= set(envelope["properties"]), f"{raw.routing_key}: undocumented field"
        undocumented = set(body["data"]) - set(data["properties"])
        assert not undocumented, f"{raw.routing_key}: undocumented data {sorted(undocumented)}"
        seen.add(raw.routing_key)
    return seen
