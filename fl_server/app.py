"""The aiohttp application and the server's lifetime: start, serve, stop cleanly.

Shutdown on SIGTERM/SIGINT is a fixed sequence: stop accepting connections, let
in-flight requests finish up to ``shutdown_timeout_s`` (a partial segment is simply
not acknowledged, and the client resends it), cancel the job loops (their state is
already in SQLite), close the database, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from common import sdnotify, wire
from common.config import ServerConfig
from fl_server import api_admin, api_client, metrics
from fl_server.app_keys import CONFIG, DB, LIMITS, RUNNER, SENDERS, UPLOADS, WORKSPACE
from fl_server.auth import auth_middleware
from fl_server.filesend import send_executor
from fl_server.http_util import error_middleware
from fl_server.limits import Limits
from fl_server.listener import build_contexts, build_site, describe_security
from fl_server.runner import JobRunner
from fl_server.state import StateDB
from fl_server.workspace import Workspace

log = logging.getLogger("fl_server")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(cfg: ServerConfig) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=1024 * 1024
    )
    ws = Workspace(cfg.workspace)
    db = StateDB(ws.db_path)
    app[CONFIG] = cfg
    app[WORKSPACE] = ws
    app[DB] = db
    app[RUNNER] = JobRunner(cfg, ws, db)
    app[UPLOADS] = set()
    app[LIMITS] = Limits.from_config(cfg.limits)
    app[SENDERS] = send_executor()
    r = app.router
    r.add_get(wire.HEALTH, health)
    r.add_post(wire.HEARTBEAT, api_client.heartbeat)
    r.add_get(wire.GET_TASK, api_client.get_task)
    r.add_get(wire.TASK_MODEL, api_client.task_model)
    r.add_get(wire.UPLOAD_STATUS, api_client.upload_status)
    r.add_put(wire.UPLOAD_SEGMENT, api_client.upload_segment)
    r.add_post(wire.COMMIT, api_client.commit)
    r.add_post(wire.TASK_FAIL, api_client.fail_task)
    r.add_post(wire.JOBS, api_admin.submit_job)
    r.add_get(wire.JOBS, api_admin.list_jobs)
    r.add_get(wire.JOB, api_admin.job_status)
    r.add_post(wire.JOB_ABORT, api_admin.abort_job)
    r.add_get(wire.JOB_MODEL, api_admin.job_model)
    r.add_get(wire.CLIENTS, api_admin.list_clients)
    metrics.install(app, cfg, db)
    app.cleanup_ctx.append(_run_jobs)
    app.cleanup_ctx.append(_send_threads)
    return app


async def _send_threads(app: web.Application) -> AsyncIterator[None]:
    yield
    # by now every handler has returned, and with it every send it waited for
    await asyncio.to_thread(app[SENDERS].shutdown, wait=True, cancel_futures=True)


async def _run_jobs(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[RUNNER].run(), name="job-runner")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    app[DB].close()


async def serve(cfg: ServerConfig) -> None:
    app = build_app(cfg)
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=cfg.shutdown_timeout_s, access_log=None
    )
    await runner.setup()
    contexts = await asyncio.to_thread(build_contexts, cfg)
    site = build_site(runner, cfg, contexts)
    await site.start()
    addrs = ", ".join(site.addresses)
    log.info("fl-server listening on %s (workspace %s)", addrs, cfg.workspace)
    log.log(*describe_security(cfg))
    notifier = sdnotify.Notifier.from_environ()
    notifier.ready(f"listening on {addrs}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # pings go on while in-flight requests finish: a drain is not a hang
    async with sdnotify.watchdog(notifier):
        try:
            await stop.wait()
            notifier.stopping("stopping: finishing in-flight requests")
            log.info("fl-server stopping: finishing in-flight requests")
        finally:
            await runner.cleanup()
            log.info("fl-server stopped")
            notifier.close()
