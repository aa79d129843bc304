"""The real daemons speak sd_notify to a socket the test binds, as systemd's would be."""

from __future__ import annotations

import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.integration

WATCHDOG_USEC = "1000000"  # pings every 0.5 s


class Listener:
    """A unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value
        self.seen: list[dict[str, str]] = []

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, "WATCHDOG_USEC": WATCHDOG_USEC}

    def wait_for(
        self, pred: Callable[[dict[str, str]], bool], timeout: float, what: str
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                raw = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in raw.decode().split("\n"))
            self.seen.append(fields)
            if pred(fields):
                return fields
        raise AssertionError(f"no {what} within {timeout} s; got {self.seen}")

    def count(self, key: str) -> int:
        return sum(key in m for m in self.seen)


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield Listener(sock, str(path))


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"fl-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        yield Listener(sock, "@" + name)


def test_server_ready_when_listening_watchdog_and_stopping(
    cluster: Cluster, path_listener: Listener
) -> None:
    server = cluster.start_server(wait=False, env=path_listener.env())
    ready = path_listener.wait_for(lambda m: "READY" in m, 30, "READY=1")
    assert ready["READY"] == "1"
    assert ready["STATUS"] == f"listening on 127.0.0.1:{cluster.port}"
    assert cluster.get("/v1/health") == {"status": "ok"}  # it listens when it says so
    deadline = time.monotonic() + 10
    while path_listener.count("WATCHDOG") < 3 and time.monotonic() < deadline:
        path_listener.wait_for(lambda m: "WATCHDOG" in m, 5, "WATCHDOG=1")
    assert path_listener.count("WATCHDOG") >= 3
    assert all(m.get("WATCHDOG", "1") == "1" for m in path_listener.seen)
    server.popen.send_signal(signal.SIGTERM)
    path_listener.wait_for(lambda m: "STOPPING" in m, 20, "STOPPING=1")
    assert server.popen.wait(30) == 0, server.tail()


def test_client_ready_only_once_registered_then_stopping(
    cluster: Cluster, abstract_listener: Listener
) -> None:
    client = cluster.start_client("site-1", env=abstract_listener.env(), heartbeat_interval_s=0.5)
    # no server yet: the daemon runs and pings the watchdog, but is not ready
    abstract_listener.wait_for(lambda m: "WATCHDOG" in m, 20, "WATCHDOG=1")
    with pytest.raises(AssertionError, match="no READY"):
        abstract_listener.wait_for(lambda m: "READY" in m, 2.0, "READY=1")
    assert client.alive()
    cluster.start_server()
    ready = abstract_listener.wait_for(lambda m: "READY" in m, 30, "READY=1")
    assert ready["STATUS"] == f"site site-1: connected to {cluster.url}"
    assert "site-1" in {c["name"] for c in cluster.get("/v1/admin/clients")}
    client.popen.send_signal(signal.SIGTERM)
    abstract_listener.wait_for(lambda m: "STOPPING" in m, 20, "STOPPING=1")
    assert client.popen.wait(30) == 0, client.tail()
    assert abstract_listener.count("READY") == 1
