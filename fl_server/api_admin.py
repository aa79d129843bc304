"""Handlers for admins: submit, list, status, abort, download a job's model, list clients."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from common.config import FileModel, UploadedModel
from common.errors import ConfigError, NotFound, RequestError
from common.wire import (
    ClientInfo,
    JobInfo,
    JobStatus,
    JobSubmitted,
    RoundInfo,
    SubmitJob,
    TaskInfo,
    TaskState,
)
from fl_server.app_keys import CONFIG, DB, RUNNER, SENDERS, STAGING, WORKSPACE
from fl_server.core.rules import is_alive
from fl_server.core.transitions import RoundState
from fl_server.filesend import send_file
from fl_server.http_util import json_reply, read_json
from fl_server.metrics import METRICS
from fl_server.modelgen import model_source
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
    model = body.config.model
    if isinstance(model, FileModel):
        source = model_source(model, request.app[CONFIG].allowed_model_dirs)
        if not await asyncio.to_thread(source.is_file):
            raise ConfigError(
                f"model.path: {model.path} is not a file on the server", field="model.path"
            )
    if isinstance(model, UploadedModel):
        # the job starts only on a whole, verified model: 409 naming what is missing
        await asyncio.to_thread(request.app[STAGING].verified, model.upload_id)
    job_id = await request.app[RUNNER].submit(body.config)
    return json_reply(JobSubmitted(job_id=job_id), status=201)


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


async def job_model(request: web.Request) -> web.StreamResponse:
    """A job's global model after round N (default: the latest), as a file."""
    db = request.app[DB]
    job = await db.run(db.get_job, request.match_info["job_id"])
    raw = request.query.get("round")
    try:
        rnd = job.round_done if raw is None else int(raw)
    except ValueError:
        raise RequestError("query parameter 'round' must be an integer", field="round") from None
    path = request.app[WORKSPACE].model_path(job.job_id, rnd)
    if rnd < 0 or rnd > job.round_done or not await asyncio.to_thread(path.is_file):
        raise NotFound(
            f"job {job.job_id} has no global model for round {rnd} "
            f"(rounds completed: {job.round_done})",
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
