"""A throw-away RabbitMQ node with a TLS listener, and the certificates it needs.

The default broker (5672) is never touched: this node has its own name, ports,
data directory, configuration and Erlang cookie, and is stopped (its whole
process group) when the session ends. Certificates come from the `openssl`
command line: a test CA, a server certificate for localhost/127.0.0.1, a
client certificate, and a client certificate from a second, untrusted CA.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _rabbitmq_scripts() -> Path:
    """The directory of RabbitMQ's own scripts (rabbitmq-server, rabbitmqctl).

    Packages often put a wrapper on PATH that links into that directory, so the link is
    followed; MQ_WORKER_TEST_RABBITMQ_BIN names the directory outright.
    """
    configured = os.environ.get("MQ_WORKER_TEST_RABBITMQ_BIN")
    if configured:
        return Path(configured)
    server = shutil.which("rabbitmq-server")
    return Path(os.path.realpath(server)).parent if server else Path("rabbitmq-server-not-on-PATH")


RABBITMQ_SERVER = _rabbitmq_scripts()
# Preferred ports; busy ones are replaced by free ones.
DEFAULT_AMQP_PORT = 5691
DEFAULT_TLS_PORT = 5692
DEFAULT_DIST_PORT = 25691
BOOT_TIMEOUT = 90.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class NodeUnavailable(Exception):
    """The node cannot be started on this machine."""


@dataclass(frozen=True)
class Pki:
    """Files of a test CA, a server and two clients (one signed by an untrusted CA)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise NodeUnavailable(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _new_ca(directory: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=mq_worker test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}.key"


def _new_leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)
    (directory / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n" + extensions
    )
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=directory)


def make_pki(directory: Path) -> Pki:
    """Create a CA, a server certificate for localhost and 127.0.0.1, and client certificates."""
    if shutil.which("openssl") is None:
        raise NodeUnavailable("the openssl command is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _new_ca(directory, "ca")
    rogue = _new_ca(directory, "rogue-ca")
    _new_leaf(directory, "server", ca,
              "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _new_leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    _new_leaf(directory, "rogue-client", rogue, "extendedKeyUsage=clientAuth\n")
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return Pki(
        ca=ca[0], server_cert=directory / "server.pem", server_key=directory / "server.key",
        client_cert=directory / "client.pem", client_key=directory / "client.key",
        rogue_ca=rogue[0], rogue_client_cert=directory / "rogue-client.pem",
        rogue_client_key=directory / "rogue-client.key",
    )


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(preferred: int | None, taken: set[int]) -> int:
    if preferred is not None and preferred not in taken and _port_free(preferred):
        return preferred
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in taken:
            return port


def _terminate_with_parent() -> None:
    """In the child: get SIGTERM when the test session's process dies, however it dies.

    rabbitmq-server's wrapper script stops the node gracefully on SIGTERM, so a
    killed test run leaves no node behind.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _amqp_answers(port: int, context: ssl.SSLContext | None = None) -> bool:
    """True when an AMQP 0-9-1 listener on `port` answers a protocol header with a frame."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            sock: socket.socket = (
                context.wrap_socket(raw, server_hostname="localhost") if context else raw
            )
            with sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                return sock.recv(1) == b"\x01"  # a method frame: connection.start
    except (OSError, ssl.SSLError):
        return False


@dataclass
class TlsNode:
    """A running throw-away node: plain AMQP on `amqp_port`, mutual TLS on `tls_port`."""

    name: str
    directory: Path
    pki: Pki
    amqp_port: int
    tls_port: int
    dist_port: int
    process: subprocess.Popen[bytes] | None = None

    def amqp_url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.amqp_port}/"

    def amqps_url(self, user: str = "guest", password: str = "guest",
                  host: str = "localhost") -> str:
        return f"amqps://{user}:{password}@{host}:{self.tls_port}/"

    def ctl(self, *args: str) -> str:
        """rabbitmqctl against this node (with its own Erlang cookie)."""
        return subprocess.run(
            [str(RABBITMQ_SERVER / "rabbitmqctl"), "-n", self.name, *args],
            env={**os.environ, "HOME": str(self.directory / "home")},
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        return context

    def _write_config(self) -> None:
        pki = self.pki
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
            f"ssl_options.cacertfile = {pki.ca}\n"
            f"ssl_options.certfile = {pki.server_cert}\n"
            f"ssl_options.keyfile = {pki.server_key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")
        home = self.directory / "home"
        home.mkdir(mode=0o700, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(uuid.uuid4().hex.upper())
            cookie.chmod(0o400)

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Boot the node and wait until both listeners answer; NodeUnavailable if it cannot."""
        server = RABBITMQ_SERVER / "rabbitmq-server"
        if not server.exists():
            raise NodeUnavailable(f"{server} does not exist")
        self._write_config()
        for sub in ("mnesia", "log"):
            (self.directory / sub).mkdir(exist_ok=True)
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.directory / "home"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.directory / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.directory / "rabbit.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        log = (self.directory / "log" / "startup.log").open("ab")
        self.process = subprocess.Popen(
            [str(server)], cwd=self.directory, env=env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        log.close()
        context = self.client_context()
        deadline = time.monotonic() + timeout
        while not (_amqp_answers(self.amqp_port) and _amqp_answers(self.tls_port, context)):
            if self.process.poll() is not None:
                raise NodeUnavailable(f"the node exited during boot:\n{self.startup_log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise NodeUnavailable(f"the node did not answer within {timeout} s:\n"
                                      f"{self.startup_log()}")
            time.sleep(0.2)

    def startup_log(self, lines: int = 30) -> str:
        path = self.directory / "log" / "startup.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node's whole process group: SIGTERM, then SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


@contextlib.contextmanager
def tls_node(directory: Path, attempts: int = 2) -> Iterator[TlsNode]:
    """A booted TLS node in `directory`, stopped on exit.

    The preferred ports are tried first; if the node cannot boot (another
    session may have taken a port in the meantime), it is tried again on
    ports the system picks.
    """
    pki = make_pki(directory / "pki")
    for attempt in range(1, attempts + 1):
        taken: set[int] = set()
        ports = []
        for preferred in (DEFAULT_AMQP_PORT, DEFAULT_TLS_PORT, DEFAULT_DIST_PORT):
            ports.append(_free_port(preferred if attempt == 1 else None, taken))
            taken.add(ports[-1])
        home = directory / f"node-{attempt}"
        home.mkdir()
        node = TlsNode(
            name=f"mqwtls{os.getpid()}x{attempt}@localhost", directory=home, pki=pki,
            amqp_port=ports[0], tls_port=ports[1], dist_port=ports[2],
        )
        try:
            node.start()
            break
        except NodeUnavailable:
            if attempt == attempts:
                raise
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def rabbitmq_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    """A RabbitMQ node with a mutual-TLS listener, booted once per session."""
    directory = tmp_path_factory.mktemp("tls-node")
    try:
        context = tls_node(directory)
        node = context.__enter__()
    except NodeUnavailable as exc:
        pytest.skip(f"cannot start a throw-away RabbitMQ node with TLS: {exc}")
    try:
        yield node
    finally:
        context.__exit__(None, None, None)
