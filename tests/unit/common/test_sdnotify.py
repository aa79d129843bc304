"""The sd_notify protocol: addresses, watchdog period, messages, and sending on a socket."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import sdnotify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_abstract_names_start_with_at() -> None:
    assert sdnotify.socket_address("@fl/notify") == b"\0fl/notify"
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"


@pytest.mark.parametrize(
    ("env", "period"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "123"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "999"}, None),  # meant for another
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_period_is_half_of_watchdog_usec(env: dict[str, str], period: float) -> None:
    assert sdnotify.watchdog_period_s(env, pid=123) == period


def test_message_format() -> None:
    assert sdnotify.message(READY=1, STATUS="listening on 0.0.0.0:8470") == (
        b"READY=1\nSTATUS=listening on 0.0.0.0:8470"
    )
    with pytest.raises(ValueError, match="one line"):
        sdnotify.message(STATUS="two\nlines")


def test_without_notify_socket_nothing_is_sent() -> None:
    n = sdnotify.Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_s is None
    n.ready("up")  # no socket, no error
    n.close()


def test_sends_to_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_s == 2.0
    n.ready("listening")
    n.stopping("bye")
    n.close()
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening"
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"


def test_sends_to_an_abstract_socket() -> None:
    name = f"fl-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        n = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        n.stopping("hello")
        n.close()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=hello"


def test_a_missing_socket_does_not_fail_the_daemon(tmp_path: Path) -> None:
    n = sdnotify.Notifier(str(tmp_path / "gone.sock"))
    n.ready("up")
    n.close()


async def test_watchdog_pings_from_the_loop_until_the_block_ends(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    sock.setblocking(False)
    n = sdnotify.Notifier(path, watchdog_s=0.05)
    async with sdnotify.watchdog(n):
        await asyncio.sleep(0.3)
    await asyncio.sleep(0.2)  # no pings after the block
    pings = []
    while True:
        try:
            pings.append(sock.recv(4096))
        except BlockingIOError:
            break
    n.close()
    assert set(pings) == {b"WATCHDOG=1"}
    assert 3 <= len(pings) <= 8


async def test_ready_when_waits_for_the_event(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    sock.setblocking(False)
    n = sdnotify.Notifier(path)
    ev = asyncio.Event()
    task = asyncio.create_task(sdnotify.ready_when(n, ev, "registered"))
    await asyncio.sleep(0.05)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)
    ev.set()
    await task
    assert sock.recv(4096) == b"READY=1\nSTATUS=registered"
    n.close()


def test_pid_check_uses_this_process() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "2000000"}
    assert sdnotify.Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_s
    assert sdnotify.Notifier.from_environ({**env, "WATCHDOG_PID": "1"}).watchdog_s is None
