"""Connections that never authenticate, opened by the thousand, for tests of admission.

``Flood`` runs its own event loop in a thread of the test process and opens connections
from 127.0.0.1, the sites' own address, of the kinds a test names (``Kind``): silent
(TCP connect, then nothing: on a TLS port that is a handshake never started), or
trickling a payload one byte per ``TRICKLE_S`` (request headers that never end, a TLS
ClientHello, or headers over a TLS connection made with a site's certificate). Each
connection waits for the server to close it and records how long it lived. ``burst``
connections are opened at once, then ``per_s`` more each second until ``stop``; the
connections still open then are left for the server to close, so ``stop`` also shows
that it closes them by its deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
import threading
import time
from dataclasses import dataclass, field

TRICKLE_S = 1.0
CONNECT_S = 20.0  # a connect beyond the listen backlog waits for a SYN retry
# the request head of a client that never finishes it
ENDLESS_HEAD = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4000


def client_hello() -> bytes:
    """The first bytes a TLS client sends: its ClientHello record."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    hello = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), hello, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
        tls.do_handshake()
    return hello.read()


def raise_fd_limit(wanted: int) -> None:
    """Let this process hold ``wanted`` descriptors, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        top = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


@dataclass(frozen=True)
class Kind:
    name: str
    payload: bytes = b""  # sent one byte per TRICKLE_S; empty: silent
    tls: ssl.SSLContext | None = None  # handshake first, with this context


@dataclass
class Flood:
    port: int
    kinds: list[Kind]
    burst: int = 1000
    per_s: float = 100.0
    opened: int = 0  # connects that succeeded
    failed: int = 0  # connects (or handshakes) the server ended first
    lifetimes: list[float] = field(default_factory=list)  # connect to close, seconds
    still_open: int = 0  # at the end: never closed by the server
    _drain_s: float = 0.0
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Flood:
        raise_fd_limit(4 * self.burst + 1024)
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float) -> None:
        """Open no more; wait up to ``timeout`` for the server to close the rest."""
        self._drain_s = timeout
        self._stopping.set()
        assert self._thread is not None
        self._thread.join(timeout + 30)
        assert not self._thread.is_alive(), "the flood did not end"

    async def _main(self) -> None:
        tasks: set[asyncio.Task[None]] = set()

        def launch(i: int) -> None:
            task = asyncio.create_task(self._one(self.kinds[i % len(self.kinds)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        for i in range(self.burst):
            launch(i)
            if i % 50 == 49:
                await asyncio.sleep(0.01)  # let connects go out before queuing more
        i = self.burst
        started = time.monotonic()
        while not self._stopping.is_set():
            due = int((time.monotonic() - started) * self.per_s)
            while i < self.burst + due:
                launch(i)
                i += 1
            await asyncio.sleep(0.02)
        if not tasks:
            return
        _, pending = await asyncio.wait(set(tasks), timeout=self._drain_s)
        self.still_open = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, kind: Kind) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1",
                    self.port,
                    ssl=kind.tls,
                    server_hostname="127.0.0.1" if kind.tls else None,
                ),
                CONNECT_S,
            )
        except (OSError, TimeoutError, ssl.SSLError):
            self.failed += 1
            return
        self.opened += 1
        began = time.monotonic()
        sent = 0
        try:
            while True:
                if sent < len(kind.payload):
                    writer.write(kind.payload[sent : sent + 1])
                    sent += 1
                try:
                    wait = TRICKLE_S if sent < len(kind.payload) else None
                    if not await asyncio.wait_for(reader.read(4096), wait):
                        break
                except TimeoutError:
                    continue
        except (OSError, ssl.SSLError):
            pass  # reset: closed all the same
        finally:
            self.lifetimes.append(time.monotonic() - began)
            writer.transport.abort()
