"""The server's side of an update upload: one segment from the request body to the spool.

Theory of operation. The request was checked before this runs (``common.segments``:
index, size, declared digest). One connection at a time may deliver a given segment
(``SegmentBusy`` for a second one) and a client may hold only so many uploads open
(``limits.max_uploads_per_client``). A segment the server has not acknowledged yet is
written at its offset in the task's spool file, its values checked as they are written;
one already acknowledged is never overwritten: a resend after a lost acknowledgement is
received into ``/dev/null``, hashed, and acknowledged again if it is the same, so a
different, cut or oversized body leaves the stored bytes as they were. Only a segment
whose digest matches what its sender declared is put on record, and the segment stays
claimed until it is: a second upload of the same index cannot write the spool between
this one's checks and its record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec

import aiohttp
from aiohttp import web

from common.config import ServerConfig
from common.errors import SegmentBusy, StorageError, UpdateRejected
from common.recycle import FilePool
from common.segments import SegmentRequest, check_arrived, check_resent
from common.storage import allocate, on_disk
from common.streams import body_pieces, receive_segment
from common.tensorfile import Manifest
from common.timeouts import ProgressTimer, Stage
from fl_server import verify
from fl_server.app_keys import CONFIG, DB, LIMITS, UPLOADS, WORKSPACE
from fl_server.limits import Limits
from fl_server.state import StateDB, TaskRow
from fl_server.workspace import Workspace

log = logging.getLogger("fl_server.api")
P = ParamSpec("P")


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


@dataclass(frozen=True)
class Received:
    """A segment on record: its digest, how many segments the task now holds, how long
    the body took."""

    digest: str
    held: int
    elapsed_s: float


@dataclass(frozen=True)
class Intake:
    """What receiving update segments needs of the server application."""

    cfg: ServerConfig
    db: StateDB
    workspace: Workspace
    limits: Limits
    busy: set[tuple[str, int]]  # (task, segment) being received now

    @classmethod
    def of(cls, app: web.Application) -> Intake:
        return cls(app[CONFIG], app[DB], app[WORKSPACE], app[LIMITS], app[UPLOADS])

    async def receive(
        self, task: TaskRow, man: Manifest, req: SegmentRequest, body: aiohttp.StreamReader
    ) -> Received:
        """Receive ``req``'s body, check it and put the segment on record."""
        key = (task.task_id, req.index)
        if key in self.busy:
            raise SegmentBusy(
                f"segment {req.index} of task {task.task_id} is already being received"
            )
        uploads = self.limits.uploads
        uploads.acquire(task.client)  # refuses beyond limits.max_uploads_per_client
        self.busy.add(key)
        try:
            started = time.monotonic()
            acked = (await self.db.run(self.db.open_task_segments, task.task_id)).get(req.index)
            digest = await self._store(task, man, req, body, acked)
            elapsed = time.monotonic() - started
            held = await self.db.run(self.db.add_segment, task.task_id, req.index, digest)
        finally:
            self.busy.discard(key)
            uploads.release(task.client)
        return Received(digest, held, elapsed)

    async def _store(
        self,
        task: TaskRow,
        man: Manifest,
        req: SegmentRequest,
        body: aiohttp.StreamReader,
        acked: str | None,
    ) -> str:
        """The body into the spool (or, when already acknowledged, nowhere); its digest."""
        spool = self.workspace.spool_path(task.job_id, task.round, task.task_id)
        if acked is None:
            fd = await _open_in_thread(_open_spool, spool, man.file_size, self.workspace.spares)
        else:
            fd = await _open_in_thread(_open_sink)
        timeouts = self.cfg.timeouts
        timer = ProgressTimer(
            timeouts.communication_timeout,
            stage=Stage.RECEIVING,
            peer=task.client,
            what=f"segment {req.index} of task {task.task_id}",
        )
        # the values are checked in the bytes as they are written, not read back; integer
        # and bool tensors against the task's model, the round's global model
        base = self.workspace.model_path(task.job_id, task.round - 1)
        values = (
            verify.SegmentValues(man.layout, req.start, req.end, base) if acked is None else None
        )
        try:
            async with timer:
                digest = await receive_segment(
                    body_pieces(body),
                    fd,
                    req.start,
                    req.size,
                    timer=timer,
                    read_timeout_s=timeouts.streaming_read_timeout,
                    batch_bytes=self.cfg.transfer.io_chunk_bytes,
                    path=spool if acked is None else os.devnull,
                    what="update spool",
                    inspect=None if values is None else values.feed,
                )
        except asyncio.CancelledError:
            # the client went away mid-body (or the server is stopping): nothing recorded
            log.warning(
                "segment %d of task %s from %s: connection closed after %d of %d bytes; "
                "not acknowledged, the client sends it again",
                req.index,
                task.task_id,
                task.client,
                timer.bytes_moved,
                req.size,
            )
            raise
        finally:
            os.close(fd)
        check_arrived(req, task.task_id, digest)
        if values is None:
            assert acked is not None
            check_resent(req, task.task_id, digest, acked)
            return digest
        if req.start == 0:
            with on_disk("update spool", spool, "read back"):
                await asyncio.to_thread(verify.check_header_early, spool, man.layout, req.end)
        if values.problem is not None:
            raise UpdateRejected(values.problem, field="tensors")
        return digest
