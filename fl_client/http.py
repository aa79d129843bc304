"""The client side of the HTTP API: one session, JSON calls under progress timers.

aiohttp's own ``ClientTimeout.total`` (5 minutes by default) would kill any long
transfer, so it is off; every call runs under ``ProgressTimer`` instead. Foreign errors
(aiohttp, OSError) become ``TransferError`` here and nowhere else; the server's error
bodies become the same ``FLError`` class they were on the server.
"""

from __future__ import annotations

import json
from typing import TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from common.errors import FLError, ProtocolError, TransferError, from_wire
from common.timeouts import ProgressTimer, Stage, Timeouts
from common.wire import CLIENT_HEADER

R = TypeVar("R", bound=BaseModel)

CONNECT_TIMEOUT_S = 30.0


def make_session(*, identity: str | None, connections: int = 16) -> aiohttp.ClientSession:
    headers = {CLIENT_HEADER: identity} if identity else {}
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
        connector=aiohttp.TCPConnector(limit=connections),
        headers=headers,
        auto_decompress=False,
    )


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
        try:
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
                    raw = bytearray()
                    async for chunk in resp.content.iter_any():
                        timer.progress(len(chunk))
                        raw += chunk
        except FLError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise TransferError(f"{what} to {self.base_url} failed: {exc!r}") from exc
        if reply is None:
            return None
        try:
            return reply.model_validate_json(bytes(raw))
        except ValidationError as exc:
            raise ProtocolError(
                f"{what}: the server's answer does not match the protocol: {exc}"
            ) from None
