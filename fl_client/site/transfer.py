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

import aiohttp

from common.config import TransferSettings
from common.digest import segment_range
from common.errors import (
    FLError,
    IntegrityError,
    ProtocolError,
    RequestError,
    ResumeMismatch,
    SegmentBusy,
    ServerBusy,
    TooManyRequests,
    TransferError,
)
from common.http_client import Api, parse_reply, raise_for_error, read_bounded, transport_error
from common.modelio import hash_file_segments
from common.recycle import FilePool
from common.storage import allocate, on_disk
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
from fl_client.site.metrics import ClientMetrics, Direction
from fl_client.site.unjoined import run_unjoined

log = logging.getLogger("fl_client.transfer")
Progress = Callable[[int], None]
RETRY_PAUSE_S = 0.5
ACK_MAX_BYTES = 4096  # a segment's acknowledgement is ~150 bytes of JSON


def _retryable(err: FLError) -> bool:
    """Transport trouble, digest errors and busy answers are worth another try; refusals
    are not."""
    if isinstance(err, TooManyRequests | ServerBusy):
        return True
    if isinstance(err, IntegrityError | TransferError):
        return not isinstance(err, ResumeMismatch)
    return isinstance(err, SegmentBusy)


async def _with_retries(
    what: str,
    attempts: int,
    op: Callable[[], Awaitable[None]],
    on_retry: Callable[[], None] | None = None,
) -> None:
    for attempt in range(1, attempts + 1):
        try:
            await op()
            return
        except FLError as err:
            if not _retryable(err) or attempt == attempts:
                if attempt > 1:
                    raise type(err)(
                        f"{what}: gave up after {attempt} attempts: {err.message}", field=err.field
                    ) from err
                raise
            log.warning("%s: attempt %d failed (%s); retrying", what, attempt, err.message)
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(RETRY_PAUSE_S * attempt)


def _retry_counter(
    metrics: ClientMetrics | None, direction: Direction
) -> Callable[[], None] | None:
    return None if metrics is None else functools.partial(metrics.segment_retried, direction)


class Interrupted(Exception):
    """The daemon is stopping: segments in flight were finished, the rest is left to resume."""


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first failure in a (possibly nested) group: what the window's caller reacts to."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


async def _run_window(
    indices: list[int],
    window: int,
    fn: Callable[[int], Awaitable[None]],
    stopping: asyncio.Event,
) -> None:
    """Run ``fn`` over ``indices``, ``window`` at a time; stop taking new ones on ``stopping``.

    The first segment that fails for good cancels the others and its error leaves as
    itself, not wrapped in an ``ExceptionGroup``: callers handle transfer errors by class
    (resume later, give up, report), and one failed segment fails the transfer.
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in indices:
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty() and not stopping.is_set():
            await fn(queue.get_nowait())

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(window, len(indices))):
                tg.create_task(worker())
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
    if not queue.empty():
        raise Interrupted(f"{queue.qsize()} segments left for the next start")


def _journal_read(path: Path) -> dict[int, str]:
    if not path.exists():
        return {}
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    return out


def _journal_append(path: Path, index: int, digest: str) -> None:
    with on_disk("download journal", path, "append to"), open(path, "a") as f:
        f.write(f"{index} {digest}\n")


def _prepare_part(part: Path, size: int) -> bool:
    """Make ``part`` a file of ``size`` bytes; True if it was one already (a resume)."""
    with on_disk("download", part, "create"):
        part.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size == size:
                return True
            allocate(fd, size)
            return False
        finally:
            os.close(fd)


def _take_spare(pool: FilePool, part: Path, journal: Path, size: int) -> bool:
    """Start the download in a spare file of ``pool``; True if one was taken.

    None of its stale bytes counts: its journal is started afresh.
    """
    if part.exists():
        return False
    with on_disk("download", part, "create"):
        part.parent.mkdir(parents=True, exist_ok=True)
        if not pool.take(part, size):
            return False
        journal.unlink(missing_ok=True)
    return True


def _verified_segments(part: Path, journal: Path, man: Manifest) -> set[int]:
    """Journal entries whose bytes on disk still match the manifest."""
    claimed = [
        i
        for i, d in _journal_read(journal).items()
        if i < man.num_segments and d == man.segment_digests[i]
    ]
    if not claimed or not part.exists():
        return set()
    actual = hash_file_segments(part, man.segment_bytes, claimed)
    return {i for i in claimed if actual.get(i) == man.segment_digests[i]}


@dataclass
class Verified:
    """The segments of one download known to be right in ``<model>.part``, in this process.

    ``segments`` is None until a first pass reads the journal and re-hashes what it
    lists (the file may have changed while no process watched it); from then on each
    segment this process fetched and checked is added, and later passes of the same
    download (retries after a fault) trust the set instead of reading the model back.
    """

    segments: set[int] | None = None


async def download_model(
    api: Api,
    url_path: str,
    man: Manifest,
    dest: Path,
    settings: TransferSettings,
    progress: Progress,
    stopping: asyncio.Event,
    metrics: ClientMetrics | None = None,
    verified: Verified | None = None,
    pool: FilePool | None = None,
) -> None:
    """Fetch the model into ``dest`` (resuming a previous partial download).

    Pass the same ``verified`` to every attempt at one download in this process. A new
    download is written over a spare file of ``pool`` when there is one.
    """
    if await asyncio.to_thread(dest.exists):
        return
    verified = verified if verified is not None else Verified()
    part = dest.with_name(dest.name + ".part")
    journal = dest.with_name(dest.name + ".segments")
    if pool is not None and await asyncio.to_thread(
        _take_spare, pool, part, journal, man.file_size
    ):
        verified.segments = set()  # a spare: nothing in it is this model's yet
    if not await asyncio.to_thread(_prepare_part, part, man.file_size):
        verified.segments = None  # a new or resized file: nothing in it can be trusted
    if verified.segments is None:
        # re-hashing up to a whole model: a stop must not wait for it (it only reads)
        verified.segments = await run_unjoined(
            "download check", functools.partial(_verified_segments, part, journal, man)
        )
        how = "checked on disk"
    else:
        how = "verified earlier by this process"
    known = verified.segments
    done = set(known)
    if done:
        log.info(
            "download of %s resumes: %d of %d segments on disk (%s)",
            dest.name,
            len(done),
            man.num_segments,
            how,
        )
    progress(
        sum(
            segment_range(i, man.file_size, man.segment_bytes)[1]
            - segment_range(i, man.file_size, man.segment_bytes)[0]
            for i in done
        )
    )
    todo = [i for i in range(man.num_segments) if i not in done]
    journal_lock = asyncio.Lock()
    fd = await asyncio.to_thread(os.open, part, os.O_RDWR)
    timeouts = api.timeouts

    async def fetch(index: int) -> None:
        start, end = segment_range(index, man.file_size, man.segment_bytes)
        what = f"download of segment {index} of {dest.name}"
        started = time.monotonic()
        async with ProgressTimer(
            timeouts.communication_timeout, stage=Stage.WAITING, peer=api.base_url, what=what
        ) as timer:
            try:
                async with api.session.get(
                    api.url(url_path), headers={"Range": f"bytes={start}-{end - 1}"}
                ) as resp:
                    timer.enter(Stage.RECEIVING)
                    await raise_for_error(resp)
                    if resp.status != 206 and not (
                        resp.status == 200 and start == 0 and end == man.file_size
                    ):
                        raise ProtocolError(
                            f"{what}: server ignored the range (HTTP {resp.status})"
                        )
                    digest = await receive_segment(
                        body_pieces(resp.content),
                        fd,
                        start,
                        end - start,
                        timer=timer,
                        read_timeout_s=timeouts.streaming_read_timeout,
                        batch_bytes=settings.io_chunk_bytes,
                        path=part,  # its write failures are StorageError: not retried
                        what="download",
                    )
            except (aiohttp.ClientError, OSError) as exc:
                raise transport_error(exc, api.base_url, f"{what} failed: {exc!r}") from exc
        if digest != man.segment_digests[index]:
            raise IntegrityError(
                f"{what}: digest {digest}, manifest says {man.segment_digests[index]}"
            )
        async with journal_lock:
            await asyncio.to_thread(_journal_append, journal, index, digest)
        known.add(index)
        if metrics is not None:
            metrics.segment_moved(Direction.DOWNLOAD, end - start, time.monotonic() - started)
        progress(end - start)

    try:
        await _run_window(
            todo,
            settings.window,
            lambda i: _with_retries(
                f"segment {i} of {dest.name}",
                settings.max_segment_attempts,
                lambda: fetch(i),
                _retry_counter(metrics, Direction.DOWNLOAD),
            ),
            stopping,
        )
    finally:
        await asyncio.to_thread(os.close, fd)
    await asyncio.to_thread(os.replace, part, dest)
    await asyncio.to_thread(journal.unlink, True)


async def upload_update(
    api: Api,
    task_id: str,
    path: Path,
    man: Manifest,
    settings: TransferSettings,
    progress: Progress,
    stopping: asyncio.Event,
    metrics: ClientMetrics | None = None,
    num_samples: int | None = None,
) -> None:
    """Send the update's segments the server does not hold yet.

    ``num_samples``, the weight the commit will carry, goes with every segment: the
    server then averages the round's tensors as soon as all updates hold them.
    """
    status = await api.call("GET", UPLOAD_STATUS.format(task_id=task_id), UploadStatus)
    assert status is not None
    if status.file_size != man.file_size or status.segment_bytes != man.segment_bytes:
        raise ResumeMismatch(
            f"server expects an update of {status.file_size} bytes in segments of "
            f"{status.segment_bytes}; ours is {man.file_size} bytes in {man.segment_bytes}"
        )
    held = set(status.segments_done)
    if held:
        log.info(
            "upload of task %s resumes: server holds %d of %d segments",
            task_id,
            len(held),
            status.num_segments,
        )
    progress(min(man.file_size, len(held) * man.segment_bytes))
    todo = [i for i in range(status.num_segments) if i not in held]
    timeouts = api.timeouts
    headers = {} if num_samples is None else {NUM_SAMPLES_HEADER: str(num_samples)}

    async def send(index: int) -> None:
        start, end = segment_range(index, man.file_size, man.segment_bytes)
        what = f"upload of segment {index} of task {task_id}"
        started = time.monotonic()
        async with ProgressTimer(
            timeouts.communication_timeout, stage=Stage.SENDING, peer=api.base_url, what=what
        ) as timer:
            body = file_range_chunks(path, start, end, settings.io_chunk_bytes, timer)

            async def then_wait() -> AsyncIterator[bytes]:
                async for data in body:
                    yield data
                timer.enter(Stage.WAITING, timeouts.streaming_ack_wait)

            try:
                async with api.session.put(
                    api.url(UPLOAD_SEGMENT.format(task_id=task_id, index=index)),
                    data=then_wait(),
                    headers=headers | {DIGEST_HEADER: man.segment_digests[index]},
                ) as resp:
                    timer.enter(Stage.RECEIVING, timeouts.communication_timeout)
                    await raise_for_error(resp)
                    raw = await read_bounded(resp, ACK_MAX_BYTES, what, timer)
                ack = parse_reply(SegmentAck, raw, what)
            except (aiohttp.ClientError, OSError) as exc:
                raise transport_error(exc, api.base_url, f"{what} failed: {exc!r}") from exc
        if ack.digest != man.segment_digests[index] or (ack.start, ack.end) != (start, end):
            raise IntegrityError(
                f"{what}: server acknowledged {ack}, expected {start}-{end} "
                f"with digest {man.segment_digests[index]}"
            )
        if metrics is not None:
            metrics.segment_moved(Direction.UPLOAD, end - start, time.monotonic() - started)
        progress(end - start)

    await _run_window(
        todo,
        settings.window,
        lambda i: _with_retries(
            f"segment {i} of task {task_id}",
            settings.max_segment_attempts,
            lambda: send(i),
            _retry_counter(metrics, Direction.UPLOAD),
        ),
        stopping,
    )


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
