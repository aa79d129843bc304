"""systemd's service notifications (``sd_notify``), for units with ``Type=notify``.

Theory of operation. systemd passes ``NOTIFY_SOCKET``, the address of a unix datagram
socket (a path, or an abstract name written with a leading ``@``); the daemon sends it
newline-separated ``KEY=VALUE`` datagrams: ``READY=1`` once it serves (the server
listens; the client has been answered by the server), ``STOPPING=1`` when a stop
begins, ``STATUS=...`` for ``systemctl status``. With ``WatchdogSec=`` systemd also
passes ``WATCHDOG_USEC`` and kills the service if no ``WATCHDOG=1`` arrives within that
time; ``watchdog`` pings at half that period *from the event loop*, so a loop that is
blocked (a disk call or numpy work run on it by mistake) stops the pings and gets the
service restarted, as a hung daemon should.

Without ``NOTIFY_SOCKET`` (not under systemd) every call does nothing. A send never
blocks and never fails the daemon: the socket is non-blocking, and a notification that
cannot be delivered is dropped with a debug line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping

log = logging.getLogger("common.sdnotify")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def socket_address(value: str) -> str | bytes:
    """The address to send to: ``@name`` is the abstract socket ``\\0name``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_period_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None without a watchdog.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for; a child
    that inherited the environment must not ping on its parent's behalf.
    """
    raw = environ.get(WATCHDOG_USEC_ENV)
    if not raw:
        return None
    owner = environ.get(WATCHDOG_PID_ENV)
    if owner and owner != str(pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a number of microseconds", WATCHDOG_USEC_ENV, raw)
        return None
    return usec / 2e6 if usec > 0 else None


def message(**fields: str | int) -> bytes:
    """``message(READY=1, STATUS="up")`` -> ``b"READY=1\\nSTATUS=up"``."""
    for key, value in fields.items():
        if "\n" in str(value):
            raise ValueError(f"notification {key} must be one line")
    return "\n".join(f"{k}={v}" for k, v in fields.items()).encode()


class Notifier:
    """Sends notifications to ``address``; does nothing when it is None."""

    def __init__(self, address: str | bytes | None, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get(NOTIFY_SOCKET_ENV)
        address = socket_address(raw) if raw else None
        return cls(address, watchdog_period_s(env, os.getpid()) if address else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message(**fields), self.address)
        except OSError as exc:
            log.debug("cannot notify systemd (%s): %s", sorted(fields), exc)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def _ping(notifier: Notifier, period_s: float) -> None:
    while True:
        notifier.send(WATCHDOG=1)
        await asyncio.sleep(period_s)


@contextlib.asynccontextmanager
async def watchdog(notifier: Notifier) -> AsyncIterator[None]:
    """Ping systemd's watchdog from the event loop while the block runs."""
    if notifier.watchdog_s is None:
        yield
        return
    pinger = asyncio.create_task(_ping(notifier, notifier.watchdog_s), name="sd-watchdog")
    try:
        yield
    finally:
        pinger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinger


async def ready_when(notifier: Notifier, event: asyncio.Event, status: str) -> None:
    """Send ``READY=1`` once ``event`` is set (for the owner to run as a task)."""
    await event.wait()
    notifier.ready(status)
