"""Handlers for client sites: heartbeat, get_task, model download, upload, commit.

Thin adapters: they check who is calling and what state the task is in, move bytes
through ``common.streams`` and hand decisions to the runner. A request that fails any
check changes nothing: the task, the round and the global model stay as they were.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec

from aiohttp import web

from common import logctx
from common.digest import segment_count, segment_range, whole_digest
from common.errors import (
    Conflict,
    Forbidden,
    IntegrityError,
    RequestError,
    SegmentBusy,
    SegmentTooLong,
    StorageError,
    TaskExpired,
    UpdateRejected,
)
from common.recycle import FilePool
from common.storage import allocate, on_disk
from common.streams import body_pieces, receive_segment
from common.timeouts import ProgressTimer, Stage
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
from fl_server.app_keys import CONFIG, DB, LIMITS, RUNNER, SENDERS, UPLOADS, WORKSPACE
from fl_server.core.rules import task_write_refusal
from fl_server.filesend import send_file
from fl_server.http_util import caller_identity, json_reply, read_json
from fl_server.metrics import METRICS
from fl_server.state import TaskRow

log = logging.getLogger("fl_server.api")
P = ParamSpec("P")


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
        wait_s = min(float(request.query.get("wait", "0")), cfg.long_poll_s)
    except ValueError:
        raise RequestError("query parameter 'wait' must be a number of seconds") from None
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
            num_segments=segment_count(man.file_size, man.segment_bytes),
            segments_done=sorted(done),
        )
    )


async def _open_in_thread(opener: Callable[P, int], *args: P.args, **kwargs: P.kwargs) -> int:
    """``opener(...)`` (which opens a file descriptor) in a worker thread.

    If the handler is cancelled while the thread runs, the thread still opens the file:
    the descriptor is closed as soon as it returns, instead of leaking.
    """
    opening = asyncio.ensure_future(asyncio.to_thread(opener, *args, **kwargs))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise


def _close_opened(opening: asyncio.Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())


def _open_sink() -> int:
    """Where a segment the server already holds is received again: hashed, not stored."""
    return os.open(os.devnull, os.O_WRONLY)


def _open_spool(path: Path, size: int, pool: FilePool) -> int:
    """The task's spool, ``size`` bytes; a new one is a spare from ``pool`` if there is one
    (only acknowledged segments of a spool are ever read)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not path.exists():
            pool.take(path, size)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open the spool file {path}: {exc.strerror}") from exc
    try:
        if os.fstat(fd).st_size != size:  # new, or a spare of another size
            allocate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise StorageError(
            f"cannot size the spool file {path} to {size} bytes: {exc.strerror}"
        ) from exc
    return fd


def _declared_weight(request: web.Request) -> int | None:
    """The sample count a segment declares: ASCII digits only (``int()`` alone would also
    take ``+5``, ``5_0`` or other scripts' digits, none of which a site sends)."""
    raw = request.headers.get(NUM_SAMPLES_HEADER)
    if raw is None:
        return None
    try:
        value = int(raw) if raw.isascii() and raw.isdigit() else 0
    except ValueError:  # beyond Python's limit on digits in a number
        value = 0
    if value < 1:
        raise RequestError(
            f"{NUM_SAMPLES_HEADER} must be a whole number of samples of at least 1, got {raw!r}",
            field=NUM_SAMPLES_HEADER,
        )
    return value


async def upload_segment(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    db = request.app[DB]
    task = await _owned_task(request, writable=True)
    man = await request.app[RUNNER].manifest(task.job_id, task.round - 1)
    try:
        index = int(request.match_info["index"])
    except ValueError:
        raise RequestError("segment index must be an integer", field="index") from None
    count = segment_count(man.file_size, man.segment_bytes)
    if not 0 <= index < count:
        raise RequestError(f"segment index {index} is outside 0..{count - 1}", field="index")
    start, end = segment_range(index, man.file_size, man.segment_bytes)
    declared = request.headers.get(DIGEST_HEADER)
    if not declared:
        raise RequestError(f"missing {DIGEST_HEADER} header with the segment's xxh3 digest")
    weight = _declared_weight(request)
    if request.content_length is not None and request.content_length != end - start:
        error = SegmentTooLong if request.content_length > end - start else RequestError
        raise error(
            f"segment {index} must be {end - start} bytes, Content-Length says "
            f"{request.content_length}",
            field="body",
        )
    busy = request.app[UPLOADS]
    key = (task.task_id, index)
    if key in busy:
        raise SegmentBusy(f"segment {index} of task {task.task_id} is already being received")
    uploads = request.app[LIMITS].uploads
    uploads.acquire(task.client)  # refuses beyond limits.max_uploads_per_client
    busy.add(key)
    ws = request.app[WORKSPACE]
    spool = ws.spool_path(task.job_id, task.round, task.task_id)
    started = time.monotonic()
    try:
        # A segment already acknowledged is never overwritten: a resend after a lost ack
        # is hashed and acknowledged again, anything else (a different, cut or oversized
        # body) leaves the stored bytes as they were.
        acked = (await db.run(db.open_task_segments, task.task_id)).get(index)
        if acked is None:
            fd = await _open_in_thread(_open_spool, spool, man.file_size, ws.spares)
        else:
            fd = await _open_in_thread(_open_sink)
        timer = ProgressTimer(
            cfg.timeouts.communication_timeout,
            stage=Stage.RECEIVING,
            peer=task.client,
            what=f"segment {index} of task {task.task_id}",
        )
        # the values are checked in the bytes as they are written, not read back
        values = verify.SegmentValues(man.layout, start, end) if acked is None else None
        try:
            async with timer:
                digest = await receive_segment(
                    body_pieces(request.content),
                    fd,
                    start,
                    end - start,
                    timer=timer,
                    read_timeout_s=cfg.timeouts.streaming_read_timeout,
                    batch_bytes=cfg.transfer.io_chunk_bytes,
                    path=spool if acked is None else os.devnull,
                    what="update spool",
                    inspect=None if values is None else values.feed,
                )
        except asyncio.CancelledError:
            # the client went away mid-body (or the server is stopping): nothing recorded
            log.warning(
                "segment %d of task %s from %s: connection closed after %d of %d bytes; "
                "not acknowledged, the client sends it again",
                index,
                task.task_id,
                task.client,
                timer.bytes_moved,
                end - start,
            )
            raise
        finally:
            os.close(fd)
        if digest != declared:
            raise IntegrityError(
                f"segment {index} of task {task.task_id} arrived with digest {digest}, "
                f"sender declared {declared}; send it again",
                field="body",
            )
        if values is not None:
            if start == 0:
                with on_disk("update spool", spool, "read back"):
                    await asyncio.to_thread(verify.check_header_early, spool, man.layout, end)
            if values.problem is not None:
                raise UpdateRejected(values.problem, field="tensors")
        elif digest != acked:
            raise Conflict(
                f"segment {index} of task {task.task_id} is already held with digest {acked}; "
                f"the bytes sent again have digest {digest} and were not stored",
                field="body",
            )
        elapsed = time.monotonic() - started
        # the key is held until the segment is on record: a second upload of the same
        # index must not write the spool between this one's checks and its record
        held = await db.run(db.add_segment, task.task_id, index, digest)
    finally:
        busy.discard(key)
        uploads.release(task.client)
    request.app[METRICS].update_segment_received(end - start, elapsed)
    if weight is not None:
        request.app[RUNNER].declare_weight(task.task_id, weight)
    now = time.time()
    done_bytes = min(man.file_size, held * man.segment_bytes)
    await db.run(db.touch_task, task.task_id, now, Phase.UPLOADING, done_bytes, man.file_size)
    request.app[RUNNER].poke(task.job_id)
    log.debug("task %s: segment %d received (%d bytes)", task.task_id, index, end - start)
    return json_reply(
        SegmentAck(index=index, start=start, end=end, digest=digest, committed_bytes=done_bytes)
    )


async def commit(request: web.Request) -> web.Response:
    db = request.app[DB]
    task = await _owned_task(request, writable=True)
    body = await read_json(request, CommitRequest)
    man = await request.app[RUNNER].manifest(task.job_id, task.round - 1)
    count = segment_count(man.file_size, man.segment_bytes)
    have = await db.run(db.segments_of, task.task_id)
    missing = [i for i in range(count) if i not in have]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise Conflict(
            f"update of task {task.task_id} is incomplete: {len(missing)} of {count} "
            f"segments missing ({shown}); upload them before committing",
            field="segments",
        )
    digest = whole_digest([have[i] for i in range(count)])
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
