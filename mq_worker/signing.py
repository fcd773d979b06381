"""Optional message signing: an HMAC-SHA256 in a header, bound to what the message is for.

Scheme v2 (`x-mq-worker-signature-v2: t=<issued-at>,sha256=<hex>`) signs

    mq_worker.v2 LF <kind> LF <pool> LF <issued-at> LF <body>

where kind is `run`, `cancel` or `worker` (a worker event), pool the pool the message
is published to and issued-at whole Unix seconds. So a signed cancel does not verify as a run (nor
a run as a cancel), a message signed for one pool does not verify in another,
and a signature older than its maximum age is refused. A key file may hold
several keys, one per line: the first signs, any verifies (for rotation).

Scheme v1 (`x-mq-worker-signature: sha256=<hex of the body's HMAC>`) covered the
body only. Workers no longer accept it; publishers can still add it
(`legacy=True`) for workers not yet upgraded.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from mq_worker.errors import ConfigurationError, InvalidMessage
from mq_worker.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RunMessage,
    parse_run,
)
from mq_worker.topology import SIGNATURE_HEADER, SIGNATURE_V2_HEADER

MessageKind = Literal["run", "cancel", "worker"]
DEFAULT_MAX_AGE_SECONDS = 7 * 24 * 3600.0
# A worker event is acted on within the hour its pool's heartbeat stream keeps it.
WORKER_EVENT_MAX_AGE_SECONDS = 3600.0
# How far ahead of the verifier's clock an issued-at may be (clocks differ a little).
CLOCK_SKEW_SECONDS = 300.0
_PREFIX = "sha256="
_V2_DOMAIN = b"mq_worker.v2"
_V2_VALUE = re.compile(r"t=(\d{1,12}),sha256=(.*)", re.DOTALL)

__all__ = [
    "DEFAULT_MAX_AGE_SECONDS",
    "SIGNATURE_HEADER",
    "SIGNATURE_V2_HEADER",
    "Signer",
    "parse_signed_run",
    "signed_payload",
]


def signed_payload(body: bytes, *, kind: str, pool: str, issued_at: int) -> bytes:
    """The bytes a v2 signature is the HMAC-SHA256 of."""
    return b"\n".join((_V2_DOMAIN, kind.encode(), pool.encode(), str(issued_at).encode(), body))


class Signer:
    def __init__(self, keys: list[bytes], *, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS
                 ) -> None:
        if not keys or any(len(k) < 16 for k in keys):
            raise ConfigurationError("signing keys must be at least 16 bytes long")
        self._keys = keys
        self.max_age_seconds = max_age_seconds

    @classmethod
    def from_file(cls, path: Path, *, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS
                  ) -> Signer:
        try:
            lines = Path(path).read_bytes().splitlines()
        except OSError as exc:
            raise ConfigurationError(f"cannot read signing key file {path}: {exc}") from exc
        return cls([line.strip() for line in lines if line.strip()],
                   max_age_seconds=max_age_seconds)

    # -- signing ---------------------------------------------------------------------

    def headers(
        self, body: bytes, *, kind: MessageKind, pool: str, issued_at: int | None = None,
        legacy: bool = False,
    ) -> dict[str, str]:
        """The v2 signature header of a `kind` message for `pool` (and the v1 one if `legacy`)."""
        issued = int(time.time()) if issued_at is None else issued_at
        mac = hmac.new(self._keys[0], signed_payload(body, kind=kind, pool=pool,
                                                     issued_at=issued), hashlib.sha256)
        headers = {SIGNATURE_V2_HEADER: f"t={issued},{_PREFIX}{mac.hexdigest()}"}
        if legacy:
            headers[SIGNATURE_HEADER] = self.signature(body)
        return headers

    def signature(self, body: bytes) -> str:
        """The legacy (v1) signature: of the body only."""
        return _PREFIX + hmac.new(self._keys[0], body, hashlib.sha256).hexdigest()

    # -- verifying -------------------------------------------------------------------

    def verify(
        self, body: bytes, headers: Mapping[str, Any], *, kind: MessageKind, pool: str,
        now: float | None = None,
    ) -> int:
        """Raise InvalidMessage unless `headers` sign `body` as a `kind` message for `pool`.

        Returns the issued-at time; it must not be ahead of `now` by more than the
        clock skew allowance (its age is checked by `check_age`).
        """
        value = headers.get(SIGNATURE_V2_HEADER)
        if isinstance(value, bytes | bytearray):  # a long string that is not UTF-8, a byte array
            value = value.decode(errors="replace")
        match = _V2_VALUE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            legacy = " (only a v1 x-mq-worker-signature, which is no longer accepted)" \
                if SIGNATURE_HEADER in headers else ""
            raise InvalidMessage(
                f"unsigned message: no valid {SIGNATURE_V2_HEADER} header{legacy}")
        issued_at = int(match.group(1))
        # Compared as bytes: compare_digest refuses str with non-ASCII characters.
        given = match.group(2).encode("utf-8", "replace")
        payload = signed_payload(body, kind=kind, pool=pool, issued_at=issued_at)
        if not any(
            hmac.compare_digest(hmac.new(key, payload, hashlib.sha256).hexdigest().encode(), given)
            for key in self._keys
        ):
            raise InvalidMessage(
                f"forged message: signature does not match the body, kind ({kind}) "
                f"and pool ({pool})")
        ahead = issued_at - (time.time() if now is None else now)
        if ahead > CLOCK_SKEW_SECONDS:
            raise InvalidMessage(
                f"expired signature: issued {ahead:.0f} s ahead of this worker's clock")
        return issued_at

    def check_age(
        self, issued_at: int, *, not_before: datetime | None = None,
        max_age_seconds: float | None = None, now: float | None = None,
    ) -> None:
        """Raise InvalidMessage if the signature is older than the maximum age.

        The age of a run due later counts from its scheduled start time (`not_before`),
        which the signature covers: a parked run stays valid until it is due.
        """
        limit = self.max_age_seconds if max_age_seconds is None else max_age_seconds
        reference = float(issued_at)
        if not_before is not None:
            reference = max(reference, not_before.timestamp())
        age = (time.time() if now is None else now) - reference
        if age > limit:
            raise InvalidMessage(
                f"expired signature: issued {age:.0f} s ago, more than the maximum age of "
                f"{limit:.0f} s")

    def cancel_verifier(self, pool: str, max_age_seconds: float
                        ) -> Callable[[bytes, dict[str, Any]], None]:
        """What the cancel follower checks: a cancel for `pool`, issued within `max_age_seconds`."""
        def verify(body: bytes, headers: dict[str, Any]) -> None:
            issued_at = self.verify(body, headers, kind="cancel", pool=pool)
            self.check_age(issued_at, max_age_seconds=max_age_seconds)

        return verify

    def worker_event_verifier(self, pool: str) -> Callable[[bytes, Mapping[str, Any]], None]:
        """What those who act on worker events check: a worker event of `pool`, signed
        within the hour."""
        def verify(body: bytes, headers: Mapping[str, Any]) -> None:
            issued_at = self.verify(body, headers, kind="worker", pool=pool)
            self.check_age(issued_at, max_age_seconds=WORKER_EVENT_MAX_AGE_SECONDS)

        return verify

    def worker_event_headers(self, pool: str) -> Callable[[bytes], dict[str, str]]:
        """The signature header of a worker event of `pool`, issued now."""
        return lambda body: self.headers(body, kind="worker", pool=pool)


def parse_signed_run(
    body: bytes, headers: Mapping[str, Any], *, signer: Signer | None, pool: str,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> RunMessage:
    """Parse a run message, checking its signature first when `signer` is set."""
    if signer is None:
        return parse_run(body, max_bytes=max_bytes)
    issued: list[int] = []
    run = parse_run(body, max_bytes=max_bytes, verify=lambda raw: issued.append(
        signer.verify(raw, headers, kind="run", pool=pool)))
    try:
        signer.check_age(issued[0], not_before=run.scheduled_start_time)
    except InvalidMessage as exc:
        raise InvalidMessage(exc.reason, run_id=run.id) from None
    return run

