"""Who is calling, and may they: identity from the TLS certificate, a role per route.

With TLS every request's caller is the holder of the certificate its connection
presented (see ``common.identity``); nothing the caller sends can change that. Routes
under ``/v1/admin/`` and ``/metrics`` need an admin, other API routes a client site,
``/v1/health`` anyone who got through the handshake. A site's name in the
``X-FL-Client`` header must be its certificate's; the handlers then check names in URLs
and task ownership against the verified name (``http_util.caller_identity``). Without
TLS (loopback demos) the ``X-FL-Client`` header names the caller, as it always did, and
admin routes are open: that is what insecure means, and why the server says so when
it starts.
"""

from __future__ import annotations

import logging

from aiohttp import web

from common.errors import Forbidden
from common.identity import Identity, Role, identity_from_peercert
from common.metrics import METRICS_PATH
from common.wire import API, CLIENT_HEADER, HEALTH
from fl_server.app_keys import CALLER, CONFIG
from fl_server.http_util import Handler

log = logging.getLogger("fl_server.auth")
ADMIN_PREFIX = API + "/admin/"


def required_role(path: str) -> Role | None:
    """The role a route needs; None for the health check.

    ``/metrics`` is for operators, who hold admin certificates: Prometheus scrapes it
    with one (``tls_config`` with the admin's cert, key and the project CA).
    """
    if path == HEALTH:
        return None
    if path.startswith(ADMIN_PREFIX) or path == METRICS_PATH:
        return Role.ADMIN
    return Role.CLIENT


def authorize(ident: Identity, method: str, path: str, declared: str | None) -> None:
    """Refuse ``ident`` for ``method path`` unless its role fits; pure, for tests too."""
    need = required_role(path)
    if need is not None and ident.role is not need:
        wanted = "an admin certificate" if need is Role.ADMIN else "a client site's certificate"
        raise Forbidden(
            f"{method} {path} needs {wanted}; this connection presented the {ident.role} "
            f"certificate of {ident.name!r}"
        )
    if declared is not None and declared != ident.name:
        raise Forbidden(
            f"the {CLIENT_HEADER} header names {declared!r} but this connection's "
            f"certificate is {ident.name!r}'s",
            field=CLIENT_HEADER,
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.app[CONFIG].tls is None or request.match_info.http_exception is not None:
        return await handler(request)  # insecure mode, or no such route (404/405)
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport is not None else None
    ident = identity_from_peercert(peercert)
    authorize(ident, request.method, request.path, request.headers.get(CLIENT_HEADER))
    request[CALLER] = ident
    if ident.role is Role.ADMIN and request.method != "GET":
        log.info("admin %s: %s %s", ident.name, request.method, request.path)
    return await handler(request)
