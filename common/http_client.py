"""The client side of the HTTP API: one session, JSON calls under progress timers.

aiohttp's own ``ClientTimeout.total`` (5 minutes by default) would kill any long
transfer, so it is off; every call runs under ``ProgressTimer`` instead. Foreign errors
(aiohttp, OSError, a ``TimeoutError`` of the socket) become ``TransferError`` here and
nowhere else, in ``map_transport_errors``, which every request and stream of a site or
an admin runs in (``TlsError`` when a TLS handshake was refused, naming why); the
server's error bodies become the same ``FLError`` class they were on the server. With a
``tls:`` section the session presents this party's certificate and trusts only the
project CA.

Model bytes never come through here. Every other body is small, and is read whole only
up to a bound: a JSON reply up to ``JSON_REPLY_MAX_BYTES``, with a wide margin over the
largest real one (a task's manifest lists one 16-character digest per segment: a 128 GiB
model is ~100 KB of them in 32 MiB segments, ~2.5 MB in 1 MiB ones). A longer answer,
or one that does not parse as the protocol's, is a ``ProtocolError``.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterator
from typing import TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from common.config import MIB, TlsFiles
from common.errors import ProtocolError, TlsError, TransferError, from_wire
from common.timeouts import ProgressTimer, Stage, Timeouts
from common.tls import client_context, describe_handshake_failure, is_handshake_refusal
from common.wire import CLIENT_HEADER

R = TypeVar("R", bound=BaseModel)

CONNECT_TIMEOUT_S = 30.0
JSON_REPLY_MAX_BYTES = 16 * MIB


def make_session(
    *, identity: str | None, connections: int = 16, tls: TlsFiles | None = None
) -> aiohttp.ClientSession:
    headers = {CLIENT_HEADER: identity} if identity else {}
    ctx: ssl.SSLContext | bool = True if tls is None else client_context(tls)
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
        connector=aiohttp.TCPConnector(limit=connections, ssl=ctx),
        headers=headers,
        auto_decompress=False,
    )


def tls_failure(exc: BaseException, base_url: str) -> TlsError | None:
    """The refused TLS handshake behind an aiohttp error, in words; None if it is not one.

    The server's certificate is checked here, at connect; the server checks ours and,
    when it refuses it, says why in a TLS alert that arrives at connect (TLS 1.2) or
    with the first read (TLS 1.3).
    """
    cause: BaseException | None
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = exc.certificate_error
    elif isinstance(exc, aiohttp.ClientConnectorSSLError):
        cause = exc.os_error
    elif isinstance(exc, ssl.SSLError):
        cause = exc
    else:
        cause = exc.__cause__
    if not isinstance(cause, ssl.SSLError) or not is_handshake_refusal(cause):
        return None
    why = describe_handshake_failure(cause)
    if isinstance(cause, ssl.SSLCertVerificationError):
        why += " (the server's certificate, checked against tls.ca)"
    return TlsError(f"TLS handshake with {base_url} failed: {why}")


def transport_error(exc: BaseException, base_url: str, message: str) -> TransferError:
    """``exc`` (aiohttp, OSError) as the project's error: ``TlsError`` or ``message``."""
    return tls_failure(exc, base_url) or TransferError(message)


@contextlib.contextmanager
def map_transport_errors(base_url: str, what: str) -> Iterator[None]:
    """Translate the transport's errors raised inside into ``TransferError``.

    ``what`` names the request (``GET /v1/...``, ``download of segment 3 of m``); the
    message adds the transport's own words. The project's errors pass as they are:
    a ``StorageError`` of the disk a body is written to, the ``TransferTimeout`` of a
    progress timer. ``TimeoutError`` is an ``OSError``: aiohttp's socket timeouts land
    here too.
    """
    try:
        yield
    except (aiohttp.ClientError, OSError) as exc:
        raise transport_error(exc, base_url, f"{what} failed: {exc!r}") from exc


async def raise_for_error(resp: aiohttp.ClientResponse) -> None:
    """Turn an error response into the server's own error; a 2xx passes through."""
    if resp.status < 400:
        return
    raw = await resp.content.read(64 * 1024)
    try:
        payload: object = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = None
    raise from_wire(payload, status=resp.status)


async def read_bounded(
    resp: aiohttp.ClientResponse, limit: int, what: str, timer: ProgressTimer | None = None
) -> bytes:
    """The whole body of ``resp``, which must not be longer than ``limit`` bytes."""

    def too_long(size: str) -> ProtocolError:
        return ProtocolError(
            f"{what}: the server's answer is {size}, more than the {limit} bytes this client "
            "reads for it; the server is not speaking this protocol (check server_url) or "
            "is of an incompatible version"
        )

    if resp.content_length is not None and resp.content_length > limit:
        raise too_long(f"{resp.content_length} bytes")
    raw = bytearray()
    async for chunk in resp.content.iter_any():
        if timer is not None:
            timer.progress(len(chunk))
        raw += chunk
        if len(raw) > limit:
            raise too_long("longer")
    return bytes(raw)


def parse_reply(model: type[R], raw: bytes, what: str) -> R:
    """``raw`` as ``model``; anything else is the server breaking the protocol."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ProtocolError(
            f"{what}: the server's answer does not match the protocol: {exc}"
        ) from None


class Api:
    """JSON calls against the server at ``base_url``."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeouts: Timeouts) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts

    def url(self, path: str) -> str:
        return self.base_url + path

    async def call(
        self,
        method: str,
        path: str,
        reply: type[R] | None,
        *,
        body: BaseModel | None = None,
        params: dict[str, str] | None = None,
        wait_s: float = 0.0,
    ) -> R | None:
        """One request/response; ``wait_s`` extends the waiting stage (long-poll)."""
        data = body.model_dump_json().encode() if body is not None else None
        timeout = self.timeouts.communication_timeout
        waiting = None if timeout is None else timeout + wait_s
        what = f"{method} {path}"
        with map_transport_errors(self.base_url, f"{what} to {self.base_url}"):
            async with ProgressTimer(
                timeout, stage=Stage.SENDING, peer=self.base_url, what=what
            ) as timer:
                timer.enter(Stage.WAITING, waiting)
                async with self.session.request(
                    method,
                    self.url(path),
                    data=data,
                    params=params,
                    headers={"Content-Type": "application/json"} if data else None,
                ) as resp:
                    timer.enter(Stage.RECEIVING, timeout)
                    await raise_for_error(resp)
                    raw = await read_bounded(resp, JSON_REPLY_MAX_BYTES, what, timer)
        if reply is None:
            return None
        return parse_reply(reply, raw, what)
