"""Optional message signing: HMAC-SHA256 over the body, in a header.

With a key configured, a worker accepts only run and cancel messages whose
`x-mq-worker-signature` header is "sha256=" followed by the hex HMAC-SHA256 of
the body under the key. A key file may hold several keys, one per line: the
first signs, any verifies (for rotation).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mq_worker.errors import ConfigurationError, InvalidMessage

SIGNATURE_HEADER = "x-mq-worker-signature"
_PREFIX = "sha256="


class Signer:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys or any(len(k) < 16 for k in keys):
            raise ConfigurationError("signing keys must be at least 16 bytes long")
        self._keys = keys

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        try:
            lines = Path(path).read_bytes().splitlines()
        except OSError as exc:
            raise ConfigurationError(f"cannot read signing key file {path}: {exc}") from exc
        return cls([line.strip() for line in lines if line.strip()])

    def signature(self, body: bytes) -> str:
        return _PREFIX + hmac.new(self._keys[0], body, hashlib.sha256).hexdigest()

    def headers(self, body: bytes) -> dict[str, str]:
        return {SIGNATURE_HEADER: self.signature(body)}

    def verify(self, body: bytes, headers: Mapping[str, Any]) -> None:
        """Raise InvalidMessage unless `headers` carry a valid signature of `body`."""
        value = headers.get(SIGNATURE_HEADER)
        if isinstance(value, bytes | bytearray):  # a long string that is not UTF-8, a byte array
            value = value.decode(errors="replace")
        if not isinstance(value, str) or not value.startswith(_PREFIX):
            raise InvalidMessage(f"unsigned message: no valid {SIGNATURE_HEADER} header")
        # Compared as bytes: compare_digest refuses str with non-ASCII characters.
        given = value[len(_PREFIX) :].encode("utf-8", "replace")
        for key in self._keys:
            expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
            if hmac.compare_digest(expected, given):
                return
        raise InvalidMessage("forged message: signature does not match the body")
