"""systemd's readiness protocol: one datagram to the unix socket named by $NOTIFY_SOCKET.

With `Type=notify` systemd considers the service started only once it receives
`READY=1`, and shows `STATUS=` lines in `systemctl status`. Outside systemd
(no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("mq_worker.sd_notify")


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=consuming") to systemd; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify systemd", socket=os.environ.get("NOTIFY_SOCKET"),
                    error=str(exc))
        return False
    return True
