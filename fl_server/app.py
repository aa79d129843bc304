"""The aiohttp application and the server's lifetime: start, serve, stop cleanly.

Start-up is a fixed sequence: lock the workspace (one server per workspace), open the
database, listen, then start the job loops; a server that cannot listen never runs a
job. Shutdown on SIGTERM/SIGINT is one too: stop accepting connections, let in-flight
requests finish up to ``shutdown_timeout_s`` (a partial segment is simply not
acknowledged, and the client resends it), cancel the job loops (their state is already
in SQLite; long work stops within one chunk), close the database, exit 0. If the job
loops die on an error the server logs it and goes through the same shutdown, then exits
1, so that the service manager restarts it: a server answering requests without running
its jobs would look healthy and do nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from common import sdnotify, wire
from common.config import ServerConfig
from common.errors import FLError
from common.storage import on_disk
from fl_server import api_admin, api_client, api_uploads, metrics
from fl_server.app_keys import CONFIG, DB, LIMITS, RUNNER, SENDERS, STAGING, UPLOADS, WORKSPACE
from fl_server.auth import auth_middleware
from fl_server.filesend import send_executor
from fl_server.handshake import build_contexts, describe_security
from fl_server.http_util import error_middleware
from fl_server.limits import Limits
from fl_server.listener import build_site
from fl_server.runner import JobRunner
from fl_server.state import StateDB
from fl_server.workspace import Workspace

log = logging.getLogger("fl_server")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(cfg: ServerConfig, ws: Workspace) -> web.Application:
    """The application; it opens the database, which its owner closes (see ``serve``)."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=1024 * 1024
    )
    db = StateDB.open_checked(ws.db_path, ws.root / "jobs")
    app[CONFIG] = cfg
    app[WORKSPACE] = ws
    app[DB] = db
    app[RUNNER] = JobRunner(cfg, ws, db)
    app[UPLOADS] = set()
    app[LIMITS] = Limits.from_config(cfg.limits)
    app[SENDERS] = send_executor()
    app[STAGING] = app[RUNNER].staging
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
    r.add_delete(wire.JOB, api_admin.delete_job)
    r.add_get(wire.JOB_MODEL, api_admin.job_model)
    r.add_get(wire.JOB_CHECKPOINT, api_admin.job_checkpoint)
    r.add_get(wire.JOB_MANIFEST, api_admin.job_manifest)
    r.add_get(wire.CLIENTS, api_admin.list_clients)
    r.add_get(wire.UPLOADS, api_uploads.list_uploads)
    r.add_post(wire.UPLOADS, api_uploads.open_upload)
    r.add_get(wire.UPLOAD, api_uploads.upload_status)
    r.add_put(wire.UPLOAD_FILE_SEGMENT, api_uploads.upload_segment)
    metrics.install(app, cfg, db)
    app.cleanup_ctx.append(_send_threads)
    return app


async def _send_threads(app: web.Application) -> AsyncIterator[None]:
    yield
    # by now every handler has returned, and with it every send it waited for
    await asyncio.to_thread(app[SENDERS].shutdown, wait=True, cancel_futures=True)


async def serve(cfg: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT (returns 0) or until the job loops fail (returns 1)."""
    with on_disk("workspace", cfg.workspace, "use it"):
        ws = Workspace(cfg.workspace)
        lock = ws.lock()
    try:
        # spares from an earlier run: whatever job comes next may not need them
        with on_disk("workspace", cfg.workspace, "use it"):
            await asyncio.to_thread(ws.spares.clear)
            app = build_app(cfg, ws)
        try:
            return await _serve(cfg, app)
        finally:
            app[DB].close()
    finally:
        os.close(lock)


async def _serve(cfg: ServerConfig, app: web.Application) -> int:
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=cfg.shutdown_timeout_s,
        keepalive_timeout=cfg.limits.idle_timeout_s,  # only between requests
        access_log=None,
    )
    await runner.setup()
    jobs: asyncio.Task[None] | None = None
    shutting_down = False
    try:
        contexts = await asyncio.to_thread(build_contexts, cfg)
        site = build_site(runner, cfg, contexts)
        await site.start()  # a port that cannot be bound ends it here, before any job runs
        addrs = ", ".join(site.addresses)
        log.info("fl-server listening on %s (workspace %s)", addrs, cfg.workspace)
        log.log(*describe_security(cfg))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        jobs = asyncio.create_task(app[RUNNER].run(), name="job-runner")
        jobs.add_done_callback(lambda _: stop.set())  # they never end unless they failed
        notifier = sdnotify.Notifier.from_environ()
        notifier.ready(f"listening on {addrs}")
        # pings go on while in-flight requests finish: a drain is not a hang
        async with sdnotify.watchdog(notifier):
            await stop.wait()
            failed = jobs.done()
            if failed:
                _log_job_loop_failure(jobs)
            notifier.stopping("stopping: finishing in-flight requests")
            log.info("fl-server stopping: finishing in-flight requests")
            shutting_down = True
            await _shut_down(runner, jobs)
        notifier.close()
        log.info("fl-server stopped" + (" after its job loops failed" if failed else ""))
        return 1 if failed else 0
    except BaseException:
        if not shutting_down:  # start-up failed halfway: clean up what started
            await _shut_down(runner, jobs)
        raise


async def _shut_down(runner: web.AppRunner, jobs: asyncio.Task[None] | None) -> None:
    """Stop accepting, drain requests, then cancel the job loops and wait for them."""
    try:
        await runner.cleanup()
    finally:
        if jobs is not None:
            jobs.cancel()
            # a failure was logged when it happened; nothing of it is raised again here
            await asyncio.gather(jobs, return_exceptions=True)


def _log_job_loop_failure(jobs: asyncio.Task[None]) -> None:
    exc = None if jobs.cancelled() else jobs.exception()
    if exc is None:
        log.error("the job loops ended unexpectedly; stopping the server (exit status 1)")
        return
    leaves = _leaves(exc)
    words = "; ".join(f"{type(e).__name__}: {e}" for e in leaves)
    known = all(isinstance(e, FLError) for e in leaves)
    log.error(
        "the job loops stopped on an error: %s; stopping the server (exit status 1) so "
        "that it is restarted",
        words,
        exc_info=None if known else exc,
    )


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
