"""The broker's AMQP traffic on the loopback, as the kernel saw it: when each message went
over the wire, without touching the processes that sent it.

A process of its own (`python -m benchmarks._wiretap OUT`, as root: it needs CAP_NET_RAW)
reads every packet to or from port 5672 on `lo` from a packet socket, with the kernel's
receive timestamp (SO_TIMESTAMPNS, CLOCK_REALTIME: the clock of `time.time()`), and keeps the
payload of the connections it saw open (their SYN), so that each byte stream can be cut into
AMQP frames from its start. On SIGTERM it writes what it kept to OUT and exits.

`messages(OUT)` then reassembles each direction of each connection and returns every
`basic.publish` (client -> broker) and `basic.deliver` (broker -> client) with its exchange,
routing key, body, and the time of the packet that completed its body.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Self

from benchmarks._paths import PYTHON, ROOT

PORT = 5672
_ETH_P_ALL = 0x0003
_SO_TIMESTAMPNS = 35
_PACKET_OUTGOING = 4
_FRAME_END = 0xCE
_METHOD, _HEADER, _BODY = 1, 2, 3
_PUBLISH, _DELIVER = (60, 40), (60, 60)

Flow = tuple[int, int]  # (source port, destination port)


@dataclass(frozen=True)
class WireMessage:
    """One message as it went over the wire: `sent` is the packet completing its body."""

    sent: float
    direction: str  # "publish" (client -> broker) or "deliver" (broker -> client)
    client_port: int
    exchange: str
    routing_key: str
    body: bytes


def _capture(out: Path) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    sock.bind(("lo", 0))
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE
    open_flows: set[Flow] = set()
    packets: list[Packet] = []
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    sock.settimeout(0.2)
    print("capturing", flush=True)
    while not stopping:
        try:
            data, ancillary, _flags, address = sock.recvmsg(65600, 64)
        except (TimeoutError, InterruptedError):
            continue
        if address[2] != _PACKET_OUTGOING or len(data) < 54 or data[12:14] != b"\x08\x00":
            continue
        ip = 14
        ihl = (data[ip] & 0x0F) * 4
        if data[ip + 9] != 6:  # TCP
            continue
        tcp = ip + ihl
        sport, dport, seq = struct.unpack_from("!HHI", data, tcp)
        if PORT not in (sport, dport):
            continue
        flags = data[tcp + 13]
        flow = (sport, dport)
        if flags & 0x02:  # SYN: a connection opened while we listen; its stream starts here
            open_flows.add(flow)
            continue
        payload = data[tcp + (data[tcp + 12] >> 4) * 4:]
        if not payload or flow not in open_flows:
            continue
        stamp = time.time()
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanos = struct.unpack("qq", value[:16])
                stamp = seconds + nanos / 1e9
        packets.append((stamp, flow, seq, bytes(payload)))
    out.write_bytes(pickle.dumps(packets))


class Wiretap:
    """The capture process around a measurement: `with Wiretap(path) as tap: ...`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self._process = subprocess.Popen([PYTHON, "-m", "benchmarks._wiretap", str(self.out)],
                                         cwd=ROOT, stdout=subprocess.PIPE)
        assert self._process.stdout is not None
        if self._process.stdout.readline().strip() != b"capturing":
            raise RuntimeError("the wiretap did not start (it needs root: CAP_NET_RAW)")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGTERM)
            self._process.wait(30)


Packet = tuple[float, Flow, int, bytes]  # (time, flow, TCP sequence number, payload)


@dataclass
class _Assembling:
    exchange: str
    routing_key: str
    size: int = -1  # from the content header
    body: bytes = b""


def _streams(packets: list[Packet]) -> dict[Flow, list[tuple[float, bytes]]]:
    """Each flow's segments in order, retransmissions left out."""
    flows: dict[Flow, list[tuple[float, bytes]]] = defaultdict(list)
    next_seq: dict[Flow, int] = {}
    for stamp, flow, seq, payload in packets:
        expected = next_seq.get(flow)
        if expected is not None and (seq - expected) % 2**32 > 2**31:
            continue  # already seen
        next_seq[flow] = (seq + len(payload)) % 2**32
        flows[flow].append((stamp, payload))
    return flows


def _short_string(data: bytes, at: int) -> tuple[str, int]:
    size = data[at]
    return data[at + 1:at + 1 + size].decode(errors="replace"), at + 1 + size


def messages(path: Path) -> list[WireMessage]:
    """Every publish and delivery in the capture at `path`, in the order of their time."""
    found: list[WireMessage] = []
    for (sport, dport), segments in _streams(pickle.loads(path.read_bytes())).items():
        direction = "publish" if dport == PORT else "deliver"
        client_port = sport if dport == PORT else dport
        buffer = b""
        partial: dict[int, _Assembling] = {}  # per channel: the message being assembled
        for stamp, payload in segments:
            buffer += payload
            if buffer.startswith(b"AMQP"):
                buffer = buffer[8:]
            at = 0
            while len(buffer) - at >= 7:
                kind, channel, size = struct.unpack_from("!BHI", buffer, at)
                if len(buffer) - at < size + 8:
                    break
                frame = buffer[at + 7:at + 7 + size]
                if buffer[at + 7 + size] != _FRAME_END:
                    partial.clear()
                    buffer, at = b"", 0  # lost sync: this flow is not one we can read
                    break
                at += size + 8
                if kind == _METHOD:
                    method = struct.unpack_from("!HH", frame)
                    if method in (_PUBLISH, _DELIVER):
                        # publish: reserved short; deliver: consumer tag, tag, redelivered
                        start = 6 if method == _PUBLISH else 4 + 1 + frame[4] + 8 + 1
                        exchange, rest = _short_string(frame, start)
                        partial[channel] = _Assembling(exchange, _short_string(frame, rest)[0])
                    continue
                message = partial.get(channel)
                if message is None:
                    continue
                if kind == _HEADER:
                    message.size = struct.unpack_from("!Q", frame, 4)[0]
                elif kind == _BODY:
                    message.body += frame
                if message.size == len(message.body):
                    del partial[channel]
                    found.append(WireMessage(stamp, direction, client_port, message.exchange,
                                             message.routing_key, message.body))
            buffer = buffer[at:]
    found.sort(key=lambda m: m.sent)
    return found


if __name__ == "__main__":
    _capture(Path(sys.argv[1]))
