"""JSON-like data as block-style YAML, the form `docs/asyncapi.yaml` is written in."""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_./ -]*$")
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        if _PLAIN.match(value) and not value.endswith(" ") and value.lower() not in _RESERVED:
            return value
        return json.dumps(value)
    return json.dumps(value)


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            label = f"{pad}{_scalar(str(key))}:"
            if isinstance(item, dict | list) and item:
                lines.append(label)
                lines.extend(_yaml_lines(item, indent + 2))
            else:
                lines.append(f"{label} {_inline(item)}")
    else:
        for item in value:
            if isinstance(item, dict | list) and item:
                nested = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {_inline(item)}")
    return lines


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(document: dict[str, Any]) -> str:
    """`document` (JSON-like data) as block-style YAML; strings quoted where YAML needs it."""
    return "\n".join(_yaml_lines(document, 0)) + "\n"

