"""Handlers for admins: submit, list, status, abort, delete, download a job's model and
its checkpoint layout, list clients."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from common.config import UploadedModel
from common.errors import Conflict, NotFound, RequestError
from common.wire import (
    ClientInfo,
    JobDeleted,
    JobInfo,
    JobStatus,
    JobSubmitted,
    RoundInfo,
    SubmitJob,
    TaskInfo,
    TaskState,
)
from fl_server import jobcheck
from fl_server.app_keys import CONFIG, DB, RUNNER, SENDERS, STAGING, WORKSPACE
from fl_server.core import disk
from fl_server.core.rules import is_alive
from fl_server.core.transitions import TERMINAL_JOB_STATES, RoundState
from fl_server.filesend import send_file
from fl_server.http_util import json_reply, read_json
from fl_server.metrics import METRICS
from fl_server.state import JobRow


def _job_info(job: JobRow, num_rounds: int) -> JobInfo:
    return JobInfo(
        job_id=job.job_id,
        name=job.name,
        state=job.state,
        round=job.round_done,
        num_rounds=num_rounds,
        reason=job.reason,
        created_at=job.created_at,
        updated_at=job.updated_at,
        model_bytes=job.model_bytes,
    )


async def submit_job(request: web.Request) -> web.Response:
    body = await read_json(request, SubmitJob)
    cfg, runner, ws = body.config, request.app[RUNNER], request.app[WORKSPACE]
    staging = request.app[STAGING]
    if isinstance(cfg.model, UploadedModel):
        # the job starts only on a whole, verified model: 409 naming what is missing
        await asyncio.to_thread(staging.verified, cfg.model.upload_id)
    # the sites whose updates the server may spool at once
    connected = len(await runner.alive_clients(cfg.clients))
    sites = max(cfg.min_clients, len(cfg.clients) if cfg.clients is not None else connected)
    dirs = request.app[CONFIG].allowed_model_dirs
    await asyncio.to_thread(jobcheck.check_fits, cfg, ws.root, dirs, sites, staging)
    job_id = await runner.submit(cfg)
    return json_reply(JobSubmitted(job_id=job_id), status=201)


async def delete_job(request: web.Request) -> web.Response:
    """Delete an ended job: its records and every file of it. A job still pending or
    running is refused (409): abort it first."""
    db, runner = request.app[DB], request.app[RUNNER]
    job = await db.run(db.get_job, request.match_info["job_id"])
    if job.state not in TERMINAL_JOB_STATES:
        raise Conflict(
            f"job {job.job_id} is {job.state.value}; abort it first (fl-admin abort "
            f"{job.job_id}), then delete it",
            field="job_id",
        )
    await runner.delete(job.job_id)
    return json_reply(JobDeleted(job_id=job.job_id))


async def list_jobs(request: web.Request) -> web.Response:
    db = request.app[DB]
    runner = request.app[RUNNER]
    jobs = await db.run(db.list_jobs)
    out = [_job_info(j, (await runner.job_config(j.job_id)).num_rounds) for j in jobs]
    return json_reply(list(out))


async def job_status(request: web.Request) -> web.Response:
    db = request.app[DB]
    runner = request.app[RUNNER]
    job = await db.run(db.get_job, request.match_info["job_id"])
    cfg = await runner.job_config(job.job_id)
    rounds = await db.run(db.list_rounds, job.job_id)
    tasks = await db.run(db.job_tasks, job.job_id)
    return json_reply(
        JobStatus(
            job=_job_info(job, cfg.num_rounds),
            rounds=[
                RoundInfo(
                    round=r.round,
                    # a closing round has no global model yet: it shows as open
                    state="closed" if r.state is RoundState.CLOSED else "open",
                    started_at=r.started_at,
                    closed_at=r.closed_at,
                    num_updates=sum(
                        t.round == r.round and t.state is TaskState.COMMITTED for t in tasks
                    ),
                )
                for r in rounds
            ],
            tasks=[
                TaskInfo(
                    task_id=t.task_id,
                    client=t.client,
                    round=t.round,
                    state=t.state,
                    phase=t.phase,
                    bytes_done=t.bytes_done,
                    bytes_total=t.bytes_total,
                    num_samples=t.num_samples,
                    reason=t.reason,
                )
                for t in tasks
            ],
        )
    )


async def abort_job(request: web.Request) -> web.Response:
    db = request.app[DB]
    runner = request.app[RUNNER]
    job_id = request.match_info["job_id"]
    await runner.abort(job_id)
    job = await db.run(db.get_job, job_id)
    return json_reply(_job_info(job, (await runner.job_config(job_id)).num_rounds))


async def _kept_round(request: web.Request, job: JobRow) -> int:
    """The round whose global model the request asks for (``?round=N``, default: the
    latest), if the job has it: 400 for a round that is no number, 404 naming the rounds
    it has otherwise."""
    raw = request.query.get("round")
    if raw is not None and not (raw.isascii() and raw.isdigit() and len(raw) <= 12):
        raise RequestError("query parameter 'round' must be a round number", field="round")
    rnd = job.round_done if raw is None else int(raw)
    if rnd > job.round_done:
        raise NotFound(
            f"job {job.job_id} has no global model for round {rnd} "
            f"(rounds completed: {job.round_done})",
            field="round",
        )
    keep = (await request.app[RUNNER].job_config(job.job_id)).keep
    kept = disk.kept(keep, job.round_done)
    if rnd not in kept:
        raise NotFound(
            f"job {job.job_id} did not keep the global model of round {rnd}: it keeps rounds "
            f"{', '.join(map(str, sorted(kept)))} (keep: in the job file)",
            field="round",
        )
    return rnd


async def job_model(request: web.Request) -> web.StreamResponse:
    """A job's global model after round N (default: the latest), as a file."""
    db = request.app[DB]
    job = await db.run(db.get_job, request.match_info["job_id"])
    rnd = await _kept_round(request, job)
    path = request.app[WORKSPACE].model_path(job.job_id, rnd)
    if not await asyncio.to_thread(path.is_file):
        raise NotFound(
            f"job {job.job_id} has no global model for round {rnd} "
            f"(rounds completed: {job.round_done}; its initial model is still being prepared)",
            field="round",
        )
    timeout = request.app[CONFIG].timeouts.communication_timeout
    return await send_file(
        request,
        path,
        timeout_s=timeout,
        peer=request.remote or "admin",
        executor=request.app[SENDERS],
        on_sent=request.app[METRICS].result_sent,
    )


async def job_checkpoint(request: web.Request) -> web.Response:
    """How the job's model came in (``common.checkpoint.CheckpointLayout``): what a
    download needs to write any round's model out in that layout."""
    db = request.app[DB]
    job = await db.run(db.get_job, request.match_info["job_id"])
    layout = await asyncio.to_thread(request.app[WORKSPACE].load_checkpoint, job.job_id)
    if layout is None:
        raise NotFound(
            f"job {job.job_id} has no checkpoint layout: its initial model is not prepared "
            f"yet (job {job.state.value}), or it was prepared by an older server",
            field="job_id",
        )
    return json_reply(layout)


async def job_manifest(request: web.Request) -> web.Response:
    """The manifest of a job's global model after round N (default: the latest).

    What a resumable download checks each segment, and the whole model, against; the
    model route itself carries no digest.
    """
    db = request.app[DB]
    job = await db.run(db.get_job, request.match_info["job_id"])
    rnd = await _kept_round(request, job)
    # not written yet (the initial model is still being prepared): 409 naming both
    return json_reply(await request.app[RUNNER].manifest(job.job_id, rnd))


async def list_clients(request: web.Request) -> web.Response:
    db = request.app[DB]
    gone_after = request.app[CONFIG].client_gone_after_s
    now = time.time()
    rows = await db.run(db.list_clients)
    return json_reply(
        [
            ClientInfo(
                name=c.name,
                last_seen=c.last_seen,
                seconds_since_seen=round(now - c.last_seen, 3),
                alive=is_alive(c.last_seen, now, gone_after),
                phase=c.phase,
                task_id=c.task_id,
            )
            for c in rows
        ]
    )
