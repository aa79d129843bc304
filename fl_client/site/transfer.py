"""Moving models between client and server in segments, a window of them at a time.

Downloads: each segment is one HTTP range request, written straight to its offset in
``<model>.part`` through ``common.streams``; its digest is checked against the task's
manifest and the segment is recorded in a journal file. After a broken connection or a
restart only segments not in the journal are fetched again; the journal's segments are
re-hashed from disk once per process (``Verified``), not on every retry.

Uploads: each segment is one streamed PUT whose answer is the server's acknowledgement
(its digest of what it stored). Before sending, the client asks the server which
segments it already holds, so a restart re-sends only what was in flight: at most one
window. A digest mismatch re-sends the segment; repeated failures fail the transfer.

What to move, and every check of what arrived, is ``common.segments``; which failures
are tried again is ``common.outcomes``; the transport's own errors are translated by
``common.http_client``. This module is the I/O between them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from common.config import TransferSettings
from common.errors import RequestError
from common.http_client import (
    Api,
    map_transport_errors,
    parse_reply,
    raise_for_error,
    read_bounded,
)
from common.modelio import hash_file_segments
from common.recycle import FilePool
from common.segments import (
    Segments,
    check_ack,
    check_fetched,
    check_range_reply,
    journal_claims,
    upload_todo,
)
from common.streams import body_pieces, file_range_chunks, receive_segment
from common.tensorfile import Manifest
from common.timeouts import ProgressTimer, Stage
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
from fl_client.site import partfile
from fl_client.site.metrics import ClientMetrics, Direction
from fl_client.site.unjoined import run_unjoined
from fl_client.site.window import Interrupted, run_window, with_retries

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
Progress = Callable[[int], None]
ACK_MAX_BYTES = 4096  # a segment's acknowledgement is ~150 bytes of JSON


@dataclass(frozen=True)
class TransferContext:
    """What every transfer of one daemon shares: the server, the settings, where progress
    and metrics go, the stop signal and the spare files a download may write over."""

    api: Api
    settings: TransferSettings
    progress: Progress
    stopping: asyncio.Event
    metrics: ClientMetrics | None = None
    pool: FilePool | None = None

    def timer(self, stage: Stage, what: str) -> ProgressTimer:
        """The progress timer of one segment's request, starting in ``stage``."""
        timeout = self.api.timeouts.communication_timeout
        return ProgressTimer(timeout, stage=stage, peer=self.api.base_url, what=what)

    def moved(self, direction: Direction, nbytes: int, started: float) -> None:
        """One segment moved and checked: count it."""
        if self.metrics is not None:
            self.metrics.segment_moved(direction, nbytes, time.monotonic() - started)
        self.progress(nbytes)

    async def run(
        self,
        todo: list[int],
        name: Callable[[int], str],
        direction: Direction,
        move: Callable[[int], Awaitable[None]],
    ) -> None:
        """``move`` the segments ``todo``, a window at a time, each tried again while its
        failure may pass; ``name(i)`` names segment ``i`` in the log."""
        on_retry = None
        if self.metrics is not None:
            on_retry = functools.partial(self.metrics.segment_retried, direction)
        attempts = self.settings.max_segment_attempts
        await run_window(
            todo,
            self.settings.window,
            lambda i: with_retries(name(i), attempts, lambda: move(i), on_retry),
            self.stopping,
        )


@dataclass
class Verified:
    """The segments of one download known to be right in ``<model>.part``, in this process.

    ``segments`` is None until a first pass reads the journal and re-hashes what it
    lists (the file may have changed while no process watched it); from then on each
    segment this process fetched and checked is added, and later passes of the same
    download (retries after a fault) trust the set instead of reading the model back.
    """

    segments: set[int] | None = None


def _verified_segments(part: Path, journal: Path, man: Manifest) -> set[int]:
    """Journal entries whose bytes on disk still match the manifest."""
    claimed = journal_claims(partfile.read_journal(journal), man.segment_digests)
    if not claimed or not part.exists():
        return set()
    actual = hash_file_segments(part, man.segment_bytes, claimed)
    return {i for i in claimed if actual.get(i) == man.segment_digests[i]}


async def _known_segments(
    ctx: TransferContext, man: Manifest, part: Path, journal: Path, verified: Verified
) -> tuple[set[int], str]:
    """The segments of ``part`` that need no fetching, and how that is known."""
    if ctx.pool is not None and await asyncio.to_thread(
        partfile.take_spare, ctx.pool, part, journal, man.file_size
    ):
        verified.segments = set()  # a spare: nothing in it is this model's yet
    if not await asyncio.to_thread(partfile.prepare_part, part, man.file_size):
        verified.segments = None  # a new or resized file: nothing in it can be trusted
    if verified.segments is not None:
        return verified.segments, "verified earlier by this process"
    # re-hashing up to a whole model: a stop must not wait for it (it only reads)
    verified.segments = await run_unjoined(
        "download check", functools.partial(_verified_segments, part, journal, man)
    )
    return verified.segments, "checked on disk"


@dataclass(frozen=True)
class _Download:
    """One download's segments, fetched into the open ``part``."""

    ctx: TransferContext
    url_path: str
    man: Manifest
    name: str
    part: Path
    journal: Path
    fd: int
    known: set[int]  # grows with each segment fetched and checked
    journal_lock: asyncio.Lock

    async def fetch(self, index: int) -> None:
        api, man = self.ctx.api, self.man
        start, end = Segments(man.file_size, man.segment_bytes).range(index)
        what = f"download of segment {index} of {self.name}"
        started = time.monotonic()
        async with self.ctx.timer(Stage.WAITING, what) as timer:
            with map_transport_errors(api.base_url, what):
                async with api.session.get(
                    api.url(self.url_path), headers={"Range": f"bytes={start}-{end - 1}"}
                ) as resp:
                    timer.enter(Stage.RECEIVING)
                    await raise_for_error(resp)
                    check_range_reply(what, resp.status, start, end, man.file_size)
                    digest = await receive_segment(
                        body_pieces(resp.content),
                        self.fd,
                        start,
                        end - start,
                        timer=timer,
                        read_timeout_s=api.timeouts.streaming_read_timeout,
                        batch_bytes=self.ctx.settings.io_chunk_bytes,
                        path=self.part,  # its write failures are StorageError: not retried
                        what="download",
                    )
        check_fetched(what, digest, man.segment_digests[index])
        async with self.journal_lock:
            await asyncio.to_thread(partfile.append_journal, self.journal, index, digest)
        self.known.add(index)
        self.ctx.moved(Direction.DOWNLOAD, end - start, started)


async def download_model(
    ctx: TransferContext,
    url_path: str,
    man: Manifest,
    dest: Path,
    verified: Verified | None = None,
) -> None:
    """Fetch the model into ``dest`` (resuming a previous partial download).

    Pass the same ``verified`` to every attempt at one download in this process. A new
    download is written over a spare file of ``ctx.pool`` when there is one.
    """
    if await asyncio.to_thread(dest.exists):
        return
    part = dest.with_name(dest.name + ".part")
    journal = dest.with_name(dest.name + ".segments")
    known, how = await _known_segments(
        ctx, man, part, journal, verified if verified is not None else Verified()
    )
    cut = Segments(man.file_size, man.segment_bytes)
    if known:
        log.info(
            "download of %s resumes: %d of %d segments on disk (%s)",
            dest.name,
            len(known),
            man.num_segments,
            how,
        )
    ctx.progress(cut.bytes_of(known))
    todo = cut.remaining(set(known))
    fd = await asyncio.to_thread(os.open, part, os.O_RDWR)
    job = _Download(ctx, url_path, man, dest.name, part, journal, fd, known, asyncio.Lock())
    try:
        await ctx.run(todo, lambda i: f"segment {i} of {dest.name}", Direction.DOWNLOAD, job.fetch)
    finally:
        await asyncio.to_thread(os.close, fd)
    await asyncio.to_thread(os.replace, part, dest)
    await asyncio.to_thread(journal.unlink, True)


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
