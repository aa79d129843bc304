"""Accepting connections: admission, the TLS handshake, then aiohttp.

Theory of operation. ``GatedSite`` binds the listening sockets itself and accepts in
one task per socket; every accepted connection goes through the ``Gate``:

1. Admission. The gate keeps a ``fl_server.admission.Book`` of every open connection
   and its phase (TLS handshake, waiting for its first request head, authenticated).
   Below ``limits.max_connections`` a newcomer is taken; at it, the oldest connection
   that has not authenticated is closed to make room, and only when all are
   authenticated is the newcomer handed to the gate's *busy* server, whose only answer
   is 503 ``server_busy`` and a close: a caller gets a clear error instead of a reset,
   and a flood can neither exhaust file descriptors nor lock sites and admins out. A
   pending connection past its deadline (``request_head_timeout_s``) is closed by a
   timer of its own. These closes abort the connection (no TLS close_notify to wait
   for), are counted in ``fl_server_connections_closed`` and logged within a
   ``CloseLog``.
2. Set-up. ``loop.connect_accepted_socket`` makes the transport, with TLS, and hands it
   to a fresh aiohttp request handler, exactly as ``create_server`` would, through a
   ``_Watch`` that tells the gate when the connection is made and lost. The handshake's
   context comes from ``fl_server.handshake.ContextPool`` and knows the connection, so a
   refused peer is sent the reason, and the gate logs the refusal with the peer's
   address and that reason. aiohttp's ``TCPSite`` leaves the handshake to the loop,
   which drops a refusal without a word to either side.
3. Authentication. The gate wraps the request handler of the application's server: the
   first call for a connection means a whole request head arrived (and, with TLS, the
   handshake checked the client's certificate: the context requires one), so the
   connection is authenticated and no longer a candidate for closing. Between requests
   aiohttp closes it after ``idle_timeout_s`` (``keepalive_timeout``, set where the
   runner is built); the gate counts such a close as ``idle`` when it finds no request
   of the connection in progress and that long since its last one.

Every task has an owner: accept loops belong to the site, set-ups to the gate; both are
cancelled and awaited on stop. Established connections drain as aiohttp's runner
decides (``shutdown_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from common.config import ServerConfig, ServerLimits
from common.errors import ServerBusy
from common.tls import describe_handshake_failure
from fl_server.admission import (
    Book,
    CloseLog,
    Deadlines,
    Decision,
    Entry,
    Phase,
    Reason,
    close_line,
)
from fl_server.handshake import Attempt, ContextPool
from fl_server.metrics import METRICS

log = logging.getLogger("fl_server.listener")

RequestHandlerFn = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
HANDSHAKE_BACKSTOP_S = 5.0  # the loop's own handshake timeout, after the gate's


@dataclass(eq=False)
class _Conn:
    """One accepted connection, as the gate sees it (the key of its ``Book``)."""

    peer: str
    sock: socket.socket
    last_request_end: float
    setup: asyncio.Task[None] | None = None
    started: bool = False  # the set-up task ran: the loop owns the socket now
    transport: asyncio.Transport | None = None
    timer: asyncio.TimerHandle | None = None
    closed_for: Reason | None = None
    peer_ended: bool = False
    in_requests: int = 0


class _Watch(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the gate told when it is made and lost."""

    def __init__(self, inner: asyncio.Protocol, conn: _Conn, gate: Gate) -> None:
        self._inner = inner
        self._conn = conn
        self._gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._gate.connected(self._conn, cast(asyncio.Transport, transport))
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        self._conn.peer_ended = True
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)
        self._gate.lost(self._conn, exc)


class Gate:
    """Decides where each accepted connection goes, and sets it up (see the docstring)."""

    def __init__(
        self,
        main: web.Server,
        *,
        limits: ServerLimits,
        contexts: ContextPool | None,
        count: Callable[[Reason], None],
    ) -> None:
        self._main = main
        self._busy = web.Server(self._answer_busy)
        self._book: Book[_Conn] = Book(limits.max_connections)
        self._deadlines = Deadlines.from_limits(limits)
        self._contexts = contexts
        self._closes = CloseLog(count)
        self._by_transport: dict[asyncio.BaseTransport, _Conn] = {}
        self._setting_up: set[asyncio.Task[None]] = set()
        main.request_handler = self._authenticating(main.request_handler)

    @property
    def tls(self) -> bool:
        return self._contexts is not None

    def open_connections(self) -> int:
        return len(self._book)

    async def _answer_busy(self, request: web.BaseRequest) -> web.StreamResponse:
        err = ServerBusy(
            f"server busy: {self.open_connections()} connections open, its limit is "
            f"{self._book.max_connections} (limits.max_connections); retry later"
        )
        resp = web.json_response(err.to_wire(), status=err.http_status)
        resp.force_close()
        return resp

    def _authenticating(self, handler: RequestHandlerFn) -> RequestHandlerFn:
        """``handler``, first marking the request's connection authenticated."""

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            conn = self._by_transport.get(request.transport) if request.transport else None
            if conn is None:  # gone already: nothing to keep track of
                return await handler(request)
            if self._book.advance(conn, Phase.AUTHENTICATED) is not None:
                self._disarm(conn)
            conn.in_requests += 1
            try:
                return await handler(request)
            finally:
                conn.in_requests -= 1
                conn.last_request_end = asyncio.get_running_loop().time()

        return handle

    def accept(self, sock: socket.socket, peer: str) -> None:
        """Take a freshly accepted connection; set-up continues in a task of the gate."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        verdict = self._book.admit()
        if verdict.victim is not None:
            self._close(verdict.victim, Reason.EVICTED, now)
        conn = _Conn(peer, sock, last_request_end=now)
        self._book.add(conn, now, Phase.HANDSHAKE if self.tls else Phase.HEAD)
        self._arm(conn)
        server = self._main
        if verdict.decision is Decision.BUSY:
            server = self._busy
            line = close_line(Reason.BUSY, peer, None, now, len(self._book))
            self._closes.note(Reason.BUSY, line)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = loop.create_task(self._set_up(conn, server))
        conn.setup = task
        self._setting_up.add(task)
        task.add_done_callback(lambda t: self._set_up_done(t, conn))

    def _set_up_done(self, task: asyncio.Task[None], conn: _Conn) -> None:
        self._setting_up.discard(task)
        if not conn.started:  # cancelled before it ran: the socket is still ours to close
            conn.sock.close()
        if conn.transport is None:  # never connected: no connection_lost will follow
            self._forget(conn)

    async def _set_up(self, conn: _Conn, server: web.Server) -> None:
        conn.started = True
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return _Watch(server(), conn, self)

        if self._contexts is None:
            try:
                await loop.connect_accepted_socket(protocol, conn.sock)
            except OSError as exc:
                log.debug("connection from %s lost while setting up: %s", conn.peer, exc)
                conn.sock.close()
            return
        attempt = Attempt(conn.peer, conn.sock)
        ctx = self._contexts.acquire(attempt)
        backstop = self._deadlines.handshake_s + HANDSHAKE_BACKSTOP_S
        try:
            transport, _ = await loop.connect_accepted_socket(
                protocol, conn.sock, ssl=ctx, ssl_handshake_timeout=backstop
            )
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            if conn.closed_for is None:
                self._refuse(attempt, exc)
            conn.sock.close()
            return
        finally:
            self._contexts.release(ctx)
        if attempt.error is not None:  # ended without an exception after a refusal
            self._refuse(attempt, attempt.error)
            transport.close()

    def _refuse(self, attempt: Attempt, exc: BaseException) -> None:
        reason = describe_handshake_failure(attempt.error or exc)
        log.warning("TLS handshake with %s refused: %s", attempt.peer, reason)

    def connected(self, conn: _Conn, transport: asyncio.Transport) -> None:
        """The transport is up (with TLS: the handshake succeeded)."""
        conn.transport = transport
        self._by_transport[transport] = conn
        self._book.advance(conn, Phase.HEAD)

    def lost(self, conn: _Conn, exc: Exception | None) -> None:
        """The connection is gone; if the server itself ended it idle, count that."""
        entry = self._forget(conn)
        if entry is None or entry.phase is not Phase.AUTHENTICATED:
            return
        since = asyncio.get_running_loop().time() - conn.last_request_end
        ours = exc is None and not conn.peer_ended
        if ours and self._deadlines.closed_when_idle(
            in_requests=conn.in_requests, since_last_request_s=since
        ):
            now = asyncio.get_running_loop().time()
            self._closes.note(Reason.IDLE, close_line(Reason.IDLE, conn.peer, entry, now, 0))

    def _forget(self, conn: _Conn) -> Entry | None:
        self._disarm(conn)
        if conn.transport is not None:
            self._by_transport.pop(conn.transport, None)
        return self._book.remove(conn)

    def _arm(self, conn: _Conn) -> None:
        entry = self._book.entry(conn)
        due = None if entry is None else self._deadlines.due(entry)
        if due is not None:
            conn.timer = asyncio.get_running_loop().call_at(due, self._check, conn)

    def _disarm(self, conn: _Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _check(self, conn: _Conn) -> None:
        """The timer of a pending connection: close it if overdue, else wait for the next
        deadline (its handshake ended in time; now its request head must)."""
        conn.timer = None
        entry = self._book.entry(conn)
        if entry is None:
            return
        now = asyncio.get_running_loop().time()
        reason = self._deadlines.overdue(entry, now)
        if reason is None:
            self._arm(conn)
        else:
            self._close(conn, reason, now)

    def _close(self, conn: _Conn, reason: Reason, now: float) -> None:
        entry = self._book.entry(conn)
        if entry is None:
            return
        self._forget(conn)
        conn.closed_for = reason
        if conn.transport is not None:
            conn.transport.abort()  # a hostile peer gets no TLS goodbye to wait on
        elif conn.setup is not None:
            conn.setup.cancel()  # mid-handshake: the loop closes the socket
        line = close_line(reason, conn.peer, entry, now, len(self._book) + 1)
        self._closes.note(reason, line)

    async def close(self) -> None:
        """Abandon connections still being set up, and the gate's timers (shutdown)."""
        self._closes.close()
        for task in list(self._setting_up):
            task.cancel()
        await asyncio.gather(*self._setting_up, return_exceptions=True)


def _peer(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr or "unknown peer")


def bind(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` stands for (blocking: start-up only)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class GatedSite(web.BaseSite):
    """A TCP site whose connections go through a ``Gate`` (see the module docstring)."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, gate: Gate, *, backlog: int
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._gate = gate
        self._sockets: list[socket.socket] = []
        self._accepting: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        scheme = "https" if self._gate.tls else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def addresses(self) -> list[str]:
        return [_peer(s.getsockname()) for s in self._sockets]

    async def start(self) -> None:
        await super().start()
        self._sockets = bind(self._host, self._port, self._backlog)
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            task = loop.create_task(self._accept_loop(sock), name=f"accept {_peer(sock)}")
            self._accepting.add(task)

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(listening)
            except OSError as exc:  # EMFILE and the like: back off instead of spinning
                log.error("cannot accept connections: %s; retrying in 1 s", exc)
                await asyncio.sleep(1.0)
                continue
            self._gate.accept(conn, _peer(addr))

    async def stop(self) -> None:
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        self._accepting.clear()
        for sock in self._sockets:
            sock.close()
        await super().stop()
        await self._gate.close()


# --- assembly from the configuration --------------------------------------------------

BACKLOG = 256


def build_site(runner: web.AppRunner, cfg: ServerConfig, contexts: ContextPool | None) -> GatedSite:
    """The site the server listens on: TLS if ``contexts``, and the connection limit."""
    assert runner.server is not None, "runner.setup() first"
    closed = runner.app[METRICS].connections_closed
    gate = Gate(
        runner.server,
        limits=cfg.limits,
        contexts=contexts,
        count=lambda reason: closed.labels(reason.value).inc(),
    )
    return GatedSite(runner, cfg.host, cfg.port, gate, backlog=BACKLOG)
