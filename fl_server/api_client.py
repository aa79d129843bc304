"""Handlers for client sites: heartbeat, get_task, model download, upload, commit.

Thin adapters: they check who is calling and what state the task is in, leave the
segment protocol to ``common.segments`` and the bytes of an upload to
``fl_server.intake``, and hand decisions to the runner. A request that fails any
check changes nothing: the task, the round and the global model stay as they were.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from aiohttp import web

from common import logctx
from common.digest import whole_digest
from common.errors import (
    Forbidden,
    IntegrityError,
    RequestError,
    TaskExpired,
)
from common.segments import Segments, check_complete, check_segment_request
from common.storage import on_disk
from common.wire import (
    DIGEST_HEADER,
    NUM_SAMPLES_HEADER,
    TASK_MODEL,
    CommitReply,
    CommitRequest,
    Heartbeat,
    HeartbeatReply,
    Phase,
    SegmentAck,
    Task,
    TaskFailure,
    TaskReply,
    TaskState,
    UploadStatus,
)
from fl_server import verify
from fl_server.app_keys import CONFIG, DB, LIMITS, RUNNER, SENDERS, WORKSPACE
from fl_server.core.rules import task_write_refusal
from fl_server.filesend import send_file
from fl_server.http_util import caller_identity, json_reply, read_json
from fl_server.intake import Intake
from fl_server.metrics import METRICS
from fl_server.state import TaskRow

log = logging.getLogger("fl_server.api")


async def _owned_task(request: web.Request, *, writable: bool) -> TaskRow:
    """The task named in the URL, if the caller owns it (and, to write, it is still open)."""
    db = request.app[DB]
    client = caller_identity(request)
    task = await db.run(db.get_task, request.match_info["task_id"])
    if task.client != client:
        raise Forbidden(f"task {task.task_id} belongs to another client, not to {client!r}")
    logctx.bind(job=task.job_id, round=task.round, client=task.client, task=task.task_id)
    if not writable:
        return task
    # Checked here to refuse early; the write itself checks again in its own
    # transaction (see StateDB), since the state may change while the body arrives.
    rnd = await db.run(db.get_round, task.job_id, task.round)
    job = await db.run(db.get_job, task.job_id)
    refusal = task_write_refusal(
        task_id=task.task_id,
        job_id=task.job_id,
        rnd=task.round,
        state=task.state,
        reason=task.reason,
        round_state=None if rnd is None else rnd.state,
        job_state=job.state,
    )
    if refusal is not None:
        raise refusal
    return task


async def heartbeat(request: web.Request) -> web.Response:
    db = request.app[DB]
    client = caller_identity(request)
    if client != request.match_info["client"]:
        raise Forbidden(f"caller {client!r} cannot send heartbeats for another client")
    hb = await read_json(request, Heartbeat)
    task = None
    if hb.task_id is not None:
        # checked before anything is written: a refused heartbeat records nothing
        task = await db.run(db.get_task, hb.task_id)
        if task.client != client:
            raise Forbidden(f"task {hb.task_id} belongs to another client")
    now = time.time()
    await db.run(db.touch_client, client, now, hb.phase, hb.task_id)
    if task is not None:
        moved = (hb.phase, hb.bytes_done, hb.bytes_total) != (
            task.phase,
            task.bytes_done,
            task.bytes_total,
        )
        if task.state is TaskState.ASSIGNED and moved:
            await db.run(db.touch_task, task.task_id, now, hb.phase, hb.bytes_done, hb.bytes_total)
            request.app[RUNNER].poke(task.job_id)
    return json_reply(HeartbeatReply(server_time=now))


async def get_task(request: web.Request) -> web.Response:
    """Long-poll: answer with a task as soon as there is one, else after ``wait`` seconds."""
    cfg = request.app[CONFIG]
    db = request.app[DB]
    runner = request.app[RUNNER]
    client = caller_identity(request)
    if client != request.match_info["client"]:
        raise Forbidden(f"caller {client!r} cannot ask for another client's tasks")
    try:
        wait_s = min(float(request.query.get("wait", "0")[:32]), cfg.long_poll_s)
    except ValueError:
        wait_s = math.nan
    if not wait_s >= 0:  # NaN too
        raise RequestError(
            "query parameter 'wait' must be a number of seconds, 0 or more", field="wait"
        )
    deadline = time.monotonic() + max(0.0, wait_s)
    with request.app[LIMITS].long_polls.hold(client):
        while True:
            await db.run(db.touch_client, client, time.time(), None, None)
            async with runner.tasks_changed:
                row = await runner.task_for(client)
                left = deadline - time.monotonic()
                if row is None and left > 0:
                    try:
                        async with asyncio.timeout(left):
                            await runner.tasks_changed.wait()
                    except TimeoutError:
                        pass
                    continue
            break
    if row is None:
        return json_reply(TaskReply(task=None, retry_after_s=1.0))
    logctx.bind(job=row.job_id, round=row.round, client=row.client, task=row.task_id)
    cfg_job = await runner.job_config(row.job_id)
    manifest = await runner.manifest(row.job_id, row.round - 1)
    task = Task(
        task_id=row.task_id,
        job_id=row.job_id,
        job_name=cfg_job.name,
        round=row.round,
        num_rounds=cfg_job.num_rounds,
        trainer=cfg_job.trainer,
        manifest=manifest,
        model_url=TASK_MODEL.format(task_id=row.task_id),
    )
    return json_reply(TaskReply(task=task))


async def task_model(request: web.Request) -> web.StreamResponse:
    """The task's input model as a file: range requests, sent with sendfile where possible."""
    task = await _owned_task(request, writable=False)
    path = request.app[WORKSPACE].model_path(task.job_id, task.round - 1)
    if not await asyncio.to_thread(path.exists):
        raise TaskExpired(f"the model of task {task.task_id} is no longer kept")
    timeout = request.app[CONFIG].timeouts.communication_timeout
    on_sent = request.app[METRICS].model_segment_sent
    return await send_file(
        request,
        path,
        timeout_s=timeout,
        peer=task.client,
        executor=request.app[SENDERS],
        on_sent=on_sent,
    )


async def upload_status(request: web.Request) -> web.Response:
    db = request.app[DB]
    task = await _owned_task(request, writable=True)
    man = await request.app[RUNNER].manifest(task.job_id, task.round - 1)
    done = await db.run(db.segments_of, task.task_id)
    return json_reply(
        UploadStatus(
            task_id=task.task_id,
            file_size=man.file_size,
            segment_bytes=man.segment_bytes,
            num_segments=Segments(man.file_size, man.segment_bytes).count,
            segments_done=sorted(done),
        )
    )


async def upload_segment(request: web.Request) -> web.Response:
    """One segment of the task's update: checked, stored, acknowledged (``fl_server.intake``)."""
    db = request.app[DB]
    task = await _owned_task(request, writable=True)
    man = await request.app[RUNNER].manifest(task.job_id, task.round - 1)
    cut = Segments(man.file_size, man.segment_bytes)
    req = check_segment_request(
        cut,
        index=request.match_info["index"],
        digest=request.headers.get(DIGEST_HEADER),
        weight=request.headers.get(NUM_SAMPLES_HEADER),
        content_length=request.content_length,
    )
    got = await Intake.of(request.app).receive(task, man, req, request.content)
    request.app[METRICS].update_segment_received(req.size, got.elapsed_s)
    if req.weight is not None:
        request.app[RUNNER].declare_weight(task.task_id, req.weight)
    done_bytes = cut.committed_bytes(got.held)
    await db.run(
        db.touch_task, task.task_id, time.time(), Phase.UPLOADING, done_bytes, cut.file_size
    )
    request.app[RUNNER].poke(task.job_id)
    log.debug("task %s: segment %d received (%d bytes)", task.task_id, req.index, req.size)
    return json_reply(
        SegmentAck(
            index=req.index,
            start=req.start,
            end=req.end,
            digest=got.digest,
            committed_bytes=done_bytes,
        )
    )


async def commit(request: web.Request) -> web.Response:
    db = request.app[DB]
    task = await _owned_task(request, writable=True)
    body = await read_json(request, CommitRequest)
    man = await request.app[RUNNER].manifest(task.job_id, task.round - 1)
    cut = Segments(man.file_size, man.segment_bytes)
    have = await db.run(db.segments_of, task.task_id)
    check_complete(task.task_id, cut, have.keys())
    digest = whole_digest([have[i] for i in range(cut.count)])
    if digest != body.digest:
        raise IntegrityError(
            f"update of task {task.task_id} has digest {digest} on the server, the commit "
            f"declares {body.digest}",
            field="digest",
        )
    spool = request.app[WORKSPACE].spool_path(task.job_id, task.round, task.task_id)
    with on_disk("update spool", spool, "read to check"):
        await asyncio.to_thread(verify.check_update, spool, man.layout, man.segment_bytes)
    await db.run(db.commit_task, task.task_id, body.num_samples, body.metrics, digest, time.time())
    request.app[RUNNER].poke(task.job_id)
    log.info(
        "job %s round %d: update of %s committed (task %s, %d samples)",
        task.job_id,
        task.round,
        task.client,
        task.task_id,
        body.num_samples,
    )
    return json_reply(CommitReply(task_id=task.task_id, state=TaskState.COMMITTED))


async def fail_task(request: web.Request) -> web.Response:
    """The site reports it cannot deliver: the task is rejected, the round goes on."""
    db = request.app[DB]
    task = await _owned_task(request, writable=True)
    body = await read_json(request, TaskFailure)
    reason = f"site reported: {body.reason}"
    await db.run(db.reject_task, task.task_id, reason, time.time())
    ws = request.app[WORKSPACE]
    await asyncio.to_thread(ws.spares.retire, ws.spool_path(task.job_id, task.round, task.task_id))
    request.app[RUNNER].poke(task.job_id)
    log.warning(
        "job %s round %d: task %s of %s rejected: %s",
        task.job_id,
        task.round,
        task.task_id,
        task.client,
        reason,
    )
    return json_reply(CommitReply(task_id=task.task_id, state=TaskState.REJECTED))
