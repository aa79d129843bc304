"""Moving models between client and server in segments, a window of them at a time.

Downloads (``fl_client.site.download``): each segment is one HTTP range request,
written straight to its offset in ``<model>.part``, checked against the task's manifest
and recorded in a journal; a restart fetches only what the journal lacks.

Uploads: each segment is one streamed PUT whose answer is the server's acknowledgement
(its digest of what it stored). Before sending, the client asks the server which
segments it already holds, so a restart re-sends only what was in flight: at most one
window. A digest mismatch re-sends the segment; repeated failures fail the transfer.

What to move, and every check of what arrived, is ``common.segments``; which failures
are tried again is ``common.outcomes``; the transport's own errors are translated by
``common.http_client``; ``fl_client.site.window`` runs the segments a window at a
time. This module is the I/O of uploads, and the site's face for both directions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import RequestError
from common.http_client import Api, map_transport_errors, parse_reply, raise_for_error, read_bounded
from common.segments import Segments, check_ack, upload_todo
from common.streams import file_range_chunks
from common.tensorfile import Manifest
from common.timeouts import Stage
from common.wire import (
    COMMIT,
    DIGEST_HEADER,
    NUM_SAMPLES_HEADER,
    TASK_FAIL,
    UPLOAD_SEGMENT,
    UPLOAD_STATUS,
    CommitReply,
    CommitRequest,
    SegmentAck,
    TaskFailure,
    UploadStatus,
)
from fl_client.site.download import Verified, download_model
from fl_client.site.metrics import Direction
from fl_client.site.window import Interrupted, TransferContext

__all__ = [
    "ACK_MAX_BYTES",
    "Interrupted",
    "TransferContext",
    "Verified",
    "commit_update",
    "download_model",
    "report_failure",
    "upload_update",
]

log = logging.getLogger("fl_client.transfer")
ACK_MAX_BYTES = 4096  # a segment's acknowledgement is ~150 bytes of JSON


@dataclass(frozen=True)
class _Upload:
    """One update's segments, sent from ``path``."""

    ctx: TransferContext
    task_id: str
    path: Path
    man: Manifest
    headers: dict[str, str]  # sent with every segment

    async def send(self, index: int) -> None:
        api, man = self.ctx.api, self.man
        start, end = Segments(man.file_size, man.segment_bytes).range(index)
        digest = man.segment_digests[index]
        what = f"upload of segment {index} of task {self.task_id}"
        started = time.monotonic()
        timeouts = api.timeouts
        async with self.ctx.timer(Stage.SENDING, what) as timer:
            body = file_range_chunks(self.path, start, end, self.ctx.settings.io_chunk_bytes, timer)

            async def then_wait() -> AsyncIterator[bytes]:
                async for data in body:
                    yield data
                timer.enter(Stage.WAITING, timeouts.streaming_ack_wait)

            with map_transport_errors(api.base_url, what):
                async with api.session.put(
                    api.url(UPLOAD_SEGMENT.format(task_id=self.task_id, index=index)),
                    data=then_wait(),
                    headers=self.headers | {DIGEST_HEADER: digest},
                ) as resp:
                    timer.enter(Stage.RECEIVING, timeouts.communication_timeout)
                    await raise_for_error(resp)
                    raw = await read_bounded(resp, ACK_MAX_BYTES, what, timer)
            ack = parse_reply(SegmentAck, raw, what)
        check_ack(what, ack, index, start, end, digest)
        self.ctx.moved(Direction.UPLOAD, end - start, started)


async def upload_update(
    ctx: TransferContext,
    task_id: str,
    path: Path,
    man: Manifest,
    num_samples: int | None = None,
) -> None:
    """Send the update's segments the server does not hold yet.

    ``num_samples``, the weight the commit will carry, goes with every segment: the
    server then averages the round's tensors as soon as all updates hold them.
    """
    status = await ctx.api.call("GET", UPLOAD_STATUS.format(task_id=task_id), UploadStatus)
    assert status is not None
    cut = Segments(man.file_size, man.segment_bytes)
    todo = upload_todo(cut, status)
    held = set(status.segments_done)
    if held:
        log.info(
            "upload of task %s resumes: server holds %d of %d segments",
            task_id,
            len(held),
            status.num_segments,
        )
    ctx.progress(cut.committed_bytes(len(held)))
    headers = {} if num_samples is None else {NUM_SAMPLES_HEADER: str(num_samples)}
    job = _Upload(ctx, task_id, path, man, headers)
    await ctx.run(todo, lambda i: f"segment {i} of task {task_id}", Direction.UPLOAD, job.send)


async def commit_update(
    api: Api, task_id: str, man: Manifest, num_samples: int, metrics: dict[str, float]
) -> CommitReply:
    reply = await api.call(
        "POST",
        COMMIT.format(task_id=task_id),
        CommitReply,
        body=CommitRequest(digest=man.digest, num_samples=num_samples, metrics=metrics),
    )
    if reply is None:
        raise RequestError("commit got no answer")
    return reply


async def report_failure(api: Api, task_id: str, reason: str) -> None:
    await api.call(
        "POST",
        TASK_FAIL.format(task_id=task_id),
        CommitReply,
        body=TaskFailure(reason=reason[:4000]),
    )
