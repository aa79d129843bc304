"""Server-side TLS handshakes that tell the refused peer why, and the log the same.

Theory of operation. When OpenSSL refuses a client (unknown CA, expired, no certificate,
wrong key usage) it writes a TLS alert naming the cause, but the event loop's TLS layer
closes the socket before that alert has left it: the caller only sees "server
disconnected", and the loop logs nothing. Here the context's ``sslobject_class`` is
``_ReportingSSLObject``. On a refusal it records the error in the connection's
``Attempt`` and reports "want read", so that the loop sends what OpenSSL wrote (the
alert) and waits; the caller's TLS stack raises the alert's own words ("sslv3 alert
certificate expired") and closes, and the gate logs the recorded reason with the peer's
address. (A peer that does not close is cut at the handshake timeout.) A plain HTTP
request on the TLS port gets a plain HTTP 400 whose error body says to use https,
written straight to the socket before the loop closes it.

An SSL object knows its context, not its connection; so each handshake in progress
borrows a context of its own from ``ContextPool`` and the context points at the
connection's ``Attempt`` until the handshake is over. The object binds that attempt at
its first call, so a later call can never report into another connection's attempt.
The pool makes all its contexts at start-up (making one reads the certificate, key and
CA files, which must not happen on the event loop while it serves). When all are
borrowed a handshake uses a shared context without an attempt, and a refusal goes the
ordinary way: closed without an alert, the reason still logged. Security never depends
on any of this: a refused handshake raises its error again on every later call, and a
connection is used only after the handshake succeeded without a recorded error.

At start-up, ``build_contexts`` makes the pool from the ``tls:`` files and
``describe_security`` words the log line on TLS and the server certificate's expiry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from common.config import ServerConfig
from common.errors import RequestError
from common.tls import certificate_info, server_context

PLAIN_HTTP = RequestError(
    "this server accepts only HTTPS with a client certificate of its project (mutual TLS): "
    "use an https:// server_url and the tls: section that fl-provision wrote"
)


def plain_http_refusal() -> bytes:
    """The whole HTTP/1.1 response sent to a plain-HTTP request on the TLS port."""
    body = json.dumps(PLAIN_HTTP.to_wire()).encode()
    head = (
        f"HTTP/1.1 {PLAIN_HTTP.http_status} Bad Request\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Attempt:
    """One connection's handshake: where it comes from and, once refused, why."""

    peer: str
    sock: socket.socket
    error: ssl.SSLError | None = None


class AttemptContext(ssl.SSLContext):
    """An SSL context that serves one handshake at a time and knows its attempt."""

    attempt: Attempt | None = None


class _ReportingSSLObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        # Bound at the first call, while the context still serves this connection.
        attempt: Attempt | None = vars(self).setdefault(
            "_attempt", getattr(self.context, "attempt", None)
        )
        if attempt is not None and attempt.error is not None:
            raise attempt.error  # refused before: never let it go on
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            if attempt is None:
                raise
            attempt.error = exc
            if exc.reason == "HTTP_REQUEST":
                _send_now(attempt.sock, plain_http_refusal())
                raise  # nothing for TLS to send: close at once
            raise ssl.SSLWantReadError("refused; sending the alert first") from None


def _send_now(sock: socket.socket, data: bytes) -> None:
    """Best effort: a few hundred bytes into a fresh socket's empty send buffer."""
    with contextlib.suppress(OSError):  # peer gone or buffer full: the close says enough
        sock.send(data)


class ContextPool:
    """``size`` server contexts for handshakes in progress, and a shared one, all made by
    ``make`` at once (blocking: each reads the certificate, key and CA, under 1 ms)."""

    def __init__(self, make: Callable[[], AttemptContext], size: int) -> None:
        self._shared = self._new(make)  # fails at start-up if the files are unusable
        self._free = [self._new(make) for _ in range(size)]

    @staticmethod
    def _new(make: Callable[[], AttemptContext]) -> AttemptContext:
        ctx = make()
        ctx.sslobject_class = _ReportingSSLObject
        return ctx

    def acquire(self, attempt: Attempt) -> AttemptContext:
        if not self._free:
            return self._shared  # attempt stays unknown to it: refusals without an alert
        ctx = self._free.pop()
        ctx.attempt = attempt
        return ctx

    def release(self, ctx: AttemptContext) -> None:
        if ctx is not self._shared:
            ctx.attempt = None
            self._free.append(ctx)


# --- at start-up -------------------------------------------------------------------

HANDSHAKE_CONTEXTS = 64  # handshakes at once that can tell a refused peer why
CERT_WARN_BEFORE = timedelta(days=30)


def build_contexts(cfg: ServerConfig) -> ContextPool | None:
    """The TLS contexts of all handshakes, None without TLS (blocking: reads the
    certificate, key and CA files; call once at start-up, in a worker thread)."""
    if cfg.tls is None:
        return None
    files = cfg.tls
    return ContextPool(lambda: server_context(files, AttemptContext), HANDSHAKE_CONTEXTS)


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
