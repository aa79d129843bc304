"""The edge between aiohttp and the server's logic: errors out, small JSON bodies in."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from common.config_load import yaml_path
from common.errors import FLError, Forbidden, RequestError
from common.safeload import DocumentTooComplex, check_depth
from common.wire import CLIENT_HEADER
from fl_server.app_keys import CALLER, CONFIG

log = logging.getLogger("fl_server.http")
M = TypeVar("M", bound=BaseModel)
MAX_JSON_BYTES = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(err: FLError) -> web.Response:
    return web.json_response(err.to_wire(), status=err.http_status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except FLError as err:
        log.warning("%s %s -> %s: %s", request.method, request.path, err.code, err.message)
        return error_response(err)
    except web.HTTPException as exc:
        body = {"code": "http_error", "message": exc.reason, "field": None}
        return web.json_response(body, status=exc.status)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(
            {
                "code": "internal",
                "message": "internal server error (see server log)",
                "field": None,
            },
            status=500,
        )


async def read_json(request: web.Request, model: type[M]) -> M:
    """Parse a small JSON body into ``model``; errors name the field and what is wrong.

    The whole body, however it arrives: one ``read(n)`` returns only what is buffered,
    and a body split over TLS records or a slow link would be parsed from its first
    piece. Bounded by ``MAX_JSON_BYTES``, checked on the way, not after the fact.
    """
    declared = request.content_length
    if declared is not None and declared > MAX_JSON_BYTES:
        raise _too_large(declared)
    raw = bytearray()
    while chunk := await request.content.readany():
        raw += chunk
        if len(raw) > MAX_JSON_BYTES:
            raise _too_large(None)
    try:
        data = json.loads(raw or b"{}")
        check_depth(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", field="body") from None
    except (DocumentTooComplex, RecursionError) as exc:
        detail = str(exc) if isinstance(exc, DocumentTooComplex) else "nested too deep"
        raise RequestError(f"request body refused: {detail}", field="body") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # the path as the sender wrote it (no union tags: ``model.tensor_shape``)
        loc = yaml_path(model, first["loc"]) or "(body)"
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise RequestError(f"invalid request: {loc}: {msg}", field=loc) from None


def _too_large(declared: int | None) -> RequestError:
    size = "more" if declared is None else f"{declared} bytes"
    return RequestError(
        f"JSON body too large: {size}, the limit is {MAX_JSON_BYTES} bytes", field="body"
    )


def json_reply(model: BaseModel | Sequence[BaseModel], status: int = 200) -> web.Response:
    if not isinstance(model, BaseModel):
        text = "[" + ",".join(m.model_dump_json() for m in model) + "]"
    else:
        text = model.model_dump_json()
    return web.Response(text=text, status=status, content_type="application/json")


def caller_identity(request: web.Request) -> str:
    """The calling site: its certificate's name with TLS (see ``fl_server.auth``), else
    what the ``X-FL-Client`` header says (insecure mode)."""
    if CALLER in request:
        return request[CALLER].name
    if request.app[CONFIG].tls is not None:
        raise Forbidden("the caller's certificate was not checked for this route")
    name = request.headers.get(CLIENT_HEADER)
    if not name:
        raise RequestError(f"missing {CLIENT_HEADER} header naming the client site")
    return name
