"""Masking secrets in job variables before they leave a worker or reach a page.

A value is a secret when its key says so (an environment variable or a
variable named like a password, token or key) or when it is a URL with a
password, or an option of a command line named so (`--password=...`). Masked
values keep their key so an operator still sees *that* a value was set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "****"
# Names that carry credentials by convention: DB_PASSWORD, API_TOKEN, AWS_SECRET_ACCESS_KEY...
SECRET_NAME = re.compile(
    r"(PASSW(OR)?D|PASSPHRASE|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH)",
    re.IGNORECASE,
)


def is_secret_name(name: str, extra: Iterable[str] = ()) -> bool:
    return bool(SECRET_NAME.search(name)) or name in frozenset(extra)


def masked(value: Any, *, extra_names: Iterable[str] = ()) -> Any:
    """`value` (JSON-like) with secret-named entries replaced by MASK and URL passwords masked."""
    names = frozenset(extra_names)
    return _walk(value, names)


# The password of a URL of any scheme (postgresql://user:PASSWORD@host, redis://:PASSWORD@...).
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s]*:)([^/@\s]+)(@)", re.IGNORECASE)
_SECRET_OPTION = re.compile(
    r"(--?[A-Za-z0-9_-]*(?:passw(?:or)?d|secret|token|api-?key)[A-Za-z0-9_-]*(?:=|\s+))(\S+)",
    re.IGNORECASE,
)


def mask_text(text: str) -> str:
    """`text` with URL passwords and the values of secret-named command-line options masked."""
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text)
    return _SECRET_OPTION.sub(lambda m: m.group(1) + MASK, text) if "-" in text else text


# Values shown as they are, looked up before the (slower) abstract Mapping check.
_PLAIN = frozenset({bool, int, float, type(None)})


def _walk(value: Any, names: frozenset[str]) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, Mapping):
        return {
            key: (MASK if value_set(item) and isinstance(key, str)
                  and is_secret_name(key, names) else _walk(item, names))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_walk(item, names) for item in value]
    return value


def value_set(item: Any) -> bool:
    """Whether there is something to hide (a removed variable, null, stays visible as such)."""
    return item is not None and item != ""


def masked_job_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Job variables as shown outside the worker, secrets masked."""
    result = masked(dict(variables))
    assert isinstance(result, dict)
    return result
