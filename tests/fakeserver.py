"""A stand-in HTTP server on loopback for unit tests of the client's transfer code.

Each test gives it the handlers for the routes it needs, as an aiohttp application in
this process: answers the real server never sends (a malformed acknowledgement, an
endless JSON reply, a model cut short) are written out by the test. Models are made
with the real ``ModelWriter``, so the manifests and digests are the real ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestServer

from common import wire
from common.http_client import Api, make_session
from common.modelio import ModelWriter
from common.tensorfile import Manifest
from common.timeouts import Timeouts

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serve(routes: dict[tuple[str, str], Handler]) -> AsyncIterator[Api]:
    """An ``Api`` talking to a server that answers ``(method, path)`` with its handler."""
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with make_session(identity="site-1") as session:
            yield Api(session, str(server.make_url("")), Timeouts(communication_timeout=10.0))
    finally:
        await server.close()


def make_model(path: Path, *, elements: int = 10_000, segment_bytes: int = 8192) -> Manifest:
    """A one-tensor float32 model of a few segments, written for real; its manifest."""
    data = np.arange(elements, dtype=np.float32)
    with ModelWriter(path, [("w", "F32", [elements])], segment_bytes=segment_bytes) as w:
        w.write(data, name="w")
        return w.finish()


def file_ranges(path: Path) -> Handler:
    """A handler answering ``Range: bytes=a-b`` requests from ``path``, as the server does."""

    async def handler(request: web.Request) -> web.StreamResponse:
        data = await asyncio.to_thread(path.read_bytes)
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        body = data[int(first) : int(last) + 1]
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
        return web.Response(status=206, body=body, headers=headers)

    return handler


def job_status(
    job_id: str, *, state: wire.JobState, round: int, num_rounds: int, model_bytes: int
) -> Handler:
    """A handler answering the admin's status request for one job (no rounds, no tasks)."""
    info = wire.JobInfo(
        job_id=job_id,
        name="j",
        state=state,
        round=round,
        num_rounds=num_rounds,
        created_at=0.0,
        updated_at=0.0,
        model_bytes=model_bytes,
    )
    reply = wire.JobStatus(job=info, rounds=[], tasks=[]).model_dump_json()

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(text=reply)

    return handler
