"""Accepting connections: the connection limit, the TLS handshake, then aiohttp.

Theory of operation. ``GatedSite`` binds the listening sockets itself and accepts in
one task per socket; every accepted connection goes through the ``Gate``:

1. Counting. Open connections are those being set up (accepted, handshake under way)
   plus the connections of the application's aiohttp server and of the gate's own
   *busy* server. At ``limits.max_connections`` a new connection is still accepted but
   handed to the busy server, whose only answer is 503 ``server_busy`` and a close:
   the caller gets a clear error instead of a reset, and a flood cannot exhaust file
   descriptors or memory.
2. Set-up. ``loop.connect_accepted_socket`` makes the transport, with TLS under the
   handshake timeout, and hands it to a fresh aiohttp request handler, exactly as
   ``create_server`` would. The difference is the context: each handshake borrows one
   from ``fl_server.handshake.ContextPool`` that knows the connection, so a refused
   peer is sent the reason, and the gate logs the refusal with the peer's address and
   that reason. aiohttp's ``TCPSite`` leaves the handshake to the loop, which drops a
   refusal without a word to either side.

Every task has an owner: accept loops belong to the site, set-ups to the gate; both are
cancelled and awaited on stop. Established connections drain as aiohttp's runner
decides (``shutdown_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import UTC, datetime, timedelta

from aiohttp import web

from common.config import ServerConfig
from common.errors import ServerBusy
from common.tls import certificate_info, describe_handshake_failure, server_context
from fl_server.handshake import Attempt, AttemptContext, ContextPool

log = logging.getLogger("fl_server.listener")


class Gate:
    """Decides where each accepted connection goes, and sets it up (see the docstring)."""

    def __init__(
        self,
        main: web.Server,
        *,
        max_connections: int,
        contexts: ContextPool | None,
        handshake_timeout_s: float,
    ) -> None:
        self._main = main
        self._busy = web.Server(self._answer_busy)
        self._max_connections = max_connections
        self._contexts = contexts
        self._handshake_timeout_s = handshake_timeout_s
        self._setting_up: set[asyncio.Task[None]] = set()

    @property
    def tls(self) -> bool:
        return self._contexts is not None

    def open_connections(self) -> int:
        return len(self._setting_up) + len(self._main.connections) + len(self._busy.connections)

    async def _answer_busy(self, request: web.BaseRequest) -> web.StreamResponse:
        err = ServerBusy(
            f"server busy: {self.open_connections()} connections open, its limit is "
            f"{self._max_connections} (limits.max_connections); retry later"
        )
        resp = web.json_response(err.to_wire(), status=err.http_status)
        resp.force_close()
        return resp

    def accept(self, conn: socket.socket, peer: str) -> None:
        """Take a freshly accepted connection; set-up continues in a task of the gate."""
        server = self._main
        if self.open_connections() >= self._max_connections:
            server = self._busy
            log.warning(
                "connection from %s answered 503: %d connections open (limits.max_connections)",
                peer,
                self.open_connections(),
            )
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.get_running_loop().create_task(self._set_up(conn, peer, server))
        self._setting_up.add(task)
        task.add_done_callback(self._setting_up.discard)

    async def _set_up(self, conn: socket.socket, peer: str, server: web.Server) -> None:
        loop = asyncio.get_running_loop()
        if self._contexts is None:
            try:
                await loop.connect_accepted_socket(server, conn)
            except OSError as exc:
                log.debug("connection from %s lost while setting up: %s", peer, exc)
                conn.close()
            return
        attempt = Attempt(peer, conn)
        ctx = self._contexts.acquire(attempt)
        try:
            transport, _ = await loop.connect_accepted_socket(
                server, conn, ssl=ctx, ssl_handshake_timeout=self._handshake_timeout_s
            )
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            self._refuse(attempt, exc)
            conn.close()
            return
        finally:
            self._contexts.release(ctx)
        if attempt.error is not None:  # ended without an exception after a refusal
            self._refuse(attempt, attempt.error)
            transport.close()

    def _refuse(self, attempt: Attempt, exc: BaseException) -> None:
        reason = describe_handshake_failure(attempt.error or exc)
        log.warning("TLS handshake with %s refused: %s", attempt.peer, reason)

    async def close(self) -> None:
        """Abandon connections still being set up (shutdown)."""
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

HANDSHAKE_CONTEXTS = 64  # handshakes at once that can tell a refused peer why
CERT_WARN_BEFORE = timedelta(days=30)
BACKLOG = 256


def build_contexts(cfg: ServerConfig) -> ContextPool | None:
    """The TLS contexts of all handshakes, None without TLS (blocking: reads the
    certificate, key and CA files; call once at start-up, in a worker thread)."""
    if cfg.tls is None:
        return None
    files = cfg.tls
    return ContextPool(lambda: server_context(files, AttemptContext), HANDSHAKE_CONTEXTS)


def build_site(runner: web.AppRunner, cfg: ServerConfig, contexts: ContextPool | None) -> GatedSite:
    """The site the server listens on: TLS if ``contexts``, and the connection limit."""
    assert runner.server is not None, "runner.setup() first"
    gate = Gate(
        runner.server,
        max_connections=cfg.limits.max_connections,
        contexts=contexts,
        handshake_timeout_s=cfg.limits.tls_handshake_timeout_s,
    )
    return GatedSite(runner, cfg.host, cfg.port, gate, backlog=BACKLOG)


def describe_security(cfg: ServerConfig) -> tuple[int, str]:
    """The start-up log line on TLS: its level and text."""
    if cfg.tls is None:
        return logging.WARNING, (
            "TLS is off: plain HTTP, and the X-FL-Client header names the caller, so anyone "
            "who can connect can act as any site or admin. For loopback demos only; "
            "provision certificates with fl-provision and add a tls: section"
        )
    info = certificate_info(cfg.tls.cert)
    text = (
        f"mutual TLS on: presenting {info.subject} (valid until "
        f"{info.not_after:%Y-%m-%d %H:%M} UTC); callers need certificates signed by "
        f"{cfg.tls.ca}"
    )
    left = info.not_after - datetime.now(UTC)
    if left < CERT_WARN_BEFORE:
        state = "has EXPIRED" if left.total_seconds() <= 0 else f"expires in {left.days} days"
        return logging.WARNING, (
            f"{text}. The server's certificate {state}: sites will refuse it; renew it "
            "with fl-provision (remove the server folder, run again, deploy it)"
        )
    return logging.INFO, text
