"""Segments between the network and disk: received through a bounded hand-over, sent
as bounded chunks read off the event loop.

Theory of operation. Network chunks (as aiohttp hands them over, no copy) are gathered
into a batch of at most ``batch_bytes``; a full batch goes to a worker thread that
``pwritev``s it at its file offset and feeds the segment hasher. At most one batch is
being written while the next one fills, so memory per segment stream is bounded by
about two batches plus aiohttp's own read buffer, which pauses the socket when full.
If the writer has not taken a batch within ``streaming_read_timeout`` the stream is
declared stuck. The segment's digest is computed on the bytes as they were written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import xxhash

from common.errors import (
    SegmentTooLong,
    SegmentTruncated,
    TransferError,
    TransferTimeout,
)
from common.storage import storage_error
from common.timeouts import ProgressTimer


def _iov_max() -> int:
    try:
        return max(16, os.sysconf("SC_IOV_MAX"))  # POSIX guarantees at least 16
    except (ValueError, OSError):
        return 16


# ``pwritev`` takes at most this many buffers per call and fails with EINVAL beyond; a
# batch gathered from a slow link can hold many more small chunks than that.
IOV_MAX = _iov_max()


def _write_batch(
    fd: int,
    pos: int,
    batch: list[bytes],
    hasher: xxhash.xxh3_64,
    inspect: Callable[[memoryview], None] | None,
) -> None:
    views = [memoryview(b) for b in batch]
    if inspect is not None:
        for view in views:
            inspect(view)
    first = 0  # the first view not completely written yet
    while first < len(views):
        n = os.pwritev(fd, views[first : first + IOV_MAX], pos)
        pos += n
        while first < len(views) and n >= views[first].nbytes:
            hasher.update(views[first])
            n -= views[first].nbytes
            first += 1
        if n:
            hasher.update(views[first][:n])
            views[first] = views[first][n:]


async def body_pieces(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """A body's bytes in the pieces aiohttp received them, each handed over as it is.

    ``iter_any`` joins every piece buffered at the moment into one new bytes object: a
    copy of the body whenever the reader falls behind the socket, which is when the
    process is busiest. ``readchunk`` never joins pieces outside HTTP chunk boundaries.
    """
    while True:
        data, chunk_end = await stream.readchunk()
        if data:
            yield data
        elif not chunk_end:  # (b"", False): the end of the body
            return


async def receive_segment(
    chunks: AsyncIterator[bytes],
    fd: int,
    start: int,
    length: int,
    *,
    timer: ProgressTimer,
    read_timeout_s: float | None,
    batch_bytes: int,
    path: str | os.PathLike[str] | None = None,
    what: str = "segment file",
    inspect: Callable[[memoryview], None] | None = None,
) -> str:
    """Write exactly ``length`` bytes from ``chunks`` at ``start`` of ``fd``; return xxh3.

    ``inspect`` is handed the same bytes in order, in the writer thread: a check of the
    content that would otherwise read the written bytes back.

    A failing write (disk full, I/O error) is a ``StorageError`` naming ``what``, ``path``
    (the file ``fd`` is open on) and the system's reason; errors of ``chunks`` pass as
    they are.
    """
    hasher = xxhash.xxh3_64()
    pending: asyncio.Future[None] | None = None
    batch: list[bytes] = []
    filled = 0
    pos = start
    received = 0

    async def written(fut: asyncio.Future[None]) -> None:
        try:
            await asyncio.shield(fut)
        except OSError as exc:
            raise storage_error(exc, what, Path(path or "(unnamed file)"), "write") from exc

    async def hand_over() -> None:
        nonlocal pending, batch, filled, pos
        if pending is not None:
            try:
                async with asyncio.timeout(read_timeout_s):
                    await written(pending)
            except TimeoutError:
                raise TransferTimeout(
                    f"a received chunk waited more than streaming_read_timeout="
                    f"{read_timeout_s:g} s for the disk writer; the disk is stuck or overloaded"
                ) from None
        pending = asyncio.ensure_future(
            asyncio.to_thread(_write_batch, fd, pos, batch, hasher, inspect)
        )
        pos += filled
        batch, filled = [], 0

    try:
        async for chunk in chunks:
            received += len(chunk)
            timer.progress(len(chunk))
            if received > length:
                raise SegmentTooLong(f"segment body is longer than the {length} bytes it must hold")
            batch.append(chunk)
            filled += len(chunk)
            if filled >= batch_bytes:
                await hand_over()
        if received < length:
            raise SegmentTruncated(
                f"segment body ended after {received} of {length} bytes (connection cut?)"
            )
        if batch:
            await hand_over()
        if pending is not None:
            await written(pending)
    finally:
        # never let a thread write into an fd the caller is about to close
        if pending is not None and not pending.done():
            # the original error wins over the writer's own failure
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
    return str(hasher.hexdigest())


async def file_range_chunks(
    path: Path, start: int, end: int, chunk_bytes: int, timer: ProgressTimer
) -> AsyncIterator[bytes]:
    """Bytes [start, end) of ``path`` in chunks of at most ``chunk_bytes``, read in a thread.

    A fresh ``bytes`` per chunk, on purpose: the transport may keep a reference to it
    until it is on the wire, so a reused buffer could be overwritten before it is sent.
    """
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            data = await asyncio.to_thread(os.pread, fd, min(chunk_bytes, end - pos), pos)
            if not data:
                raise TransferError(f"{path} ends at byte {pos}, before byte {end}")
            pos += len(data)
            timer.progress(len(data))
            yield data
    finally:
        await asyncio.to_thread(os.close, fd)
