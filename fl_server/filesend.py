"""Sending a model file, or one byte range of it, with the kernel's ``sendfile``.

Why not ``web.FileResponse``: uvloop has no ``loop.sendfile``, so aiohttp falls back to
reading the file into a fresh 1 MiB ``bytes`` per chunk in a thread and writing that;
at GB/s that is page faults and copies, and it caps one transfer well below the disk's
rate. Here, once the response head has left the socket, a worker thread moves the range
with ``os.sendfile`` straight from the page cache to the socket: no copy into Python,
no buffer that grows with the model.

Theory of operation. The socket is non-blocking and owned by the event loop's
transport, which stays idle while the body goes out: the thread waits for the socket
to be writable with ``poll`` and calls ``sendfile``; the event loop only watches the
progress timer. When the handler is cancelled (the client went away, the server is
stopping) or the timer fires, the thread is told to stop and the handler waits for it
before returning (``fl_server.threads``), so no thread ever writes to a socket the
transport has closed (its descriptor number could already belong to another
connection). Over TLS the kernel cannot encrypt, so the range goes through the
transport in bounded chunks instead.

The threads are the application's own pool (``send_executor``), not the event loop's
default one: a send holds its thread for the whole range, minutes for a large model,
and eight of them (two sites, four segments each) would otherwise take every thread
the database and disk calls of all other requests and of the job loops wait for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from common.errors import RangeNotSatisfiable, TransferTimeout
from common.streams import file_range_chunks
from common.timeouts import ProgressTimer, Stage
from fl_server.threads import run_stoppable

log = logging.getLogger("fl_server.filesend")
POLL_MS = 200
TLS_CHUNK_BYTES = 1024 * 1024
# Plain-HTTP ranges sent at once (sites x transfer.window, plus admin downloads); more
# wait for a free thread, under their progress timer. A sending thread mostly waits in
# poll() for the peer: it costs a stack, not a core.
SEND_THREADS = 32
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` asked for by a ``Range`` header; ``None`` for the whole file.

    One range only (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``): that is all a transfer
    of this project asks for, and a multipart answer would be a copy of no use.
    """
    if header is None:
        return None
    m = _RANGE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable(
            f"unsupported Range {header!r}: give one range such as bytes=0-1023", field="Range"
        )
    first, last = m.group(1), m.group(2)
    if not first:  # the last n bytes
        n = int(last)
        start, end = max(0, size - n), size
    else:
        start = int(first)
        end = size if not last else min(size, int(last) + 1)
    if start >= size or start >= end:
        raise RangeNotSatisfiable(
            f"Range {header!r} lies outside the file of {size} bytes", field="Range"
        )
    return start, end


def send_executor() -> ThreadPoolExecutor:
    """The pool ``send_file`` sends in; its owner shuts it down (see ``fl_server.app``)."""
    return ThreadPoolExecutor(max_workers=SEND_THREADS, thread_name_prefix="fl-sendfile")


def _sendfile_loop(
    stop: threading.Event,
    sock_fd: int,
    path: Path,
    start: int,
    end: int,
    progress: Callable[[int], None],
) -> None:
    """Blocking: move file bytes [start, end) to the socket, until done or ``stop``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(sock_fd, select.POLLOUT)
        pos = start
        while pos < end and not stop.is_set():
            try:
                sent = os.sendfile(sock_fd, fd, pos, end - pos)
            except BlockingIOError:
                poller.poll(POLL_MS)
                continue
            if sent == 0:
                raise ConnectionResetError(f"{path} ends at byte {pos}, before {end}")
            pos += sent
            progress(sent)
    finally:
        os.close(fd)


async def _write_chunks(
    response: web.StreamResponse, path: Path, start: int, end: int, timer: ProgressTimer
) -> None:
    async for data in file_range_chunks(path, start, end, TLS_CHUNK_BYTES, timer):
        await response.write(data)


async def send_file(
    request: web.Request,
    path: Path,
    *,
    timeout_s: float | None,
    peer: str,
    executor: Executor,
    on_sent: Callable[[int, float], None] | None = None,
) -> web.StreamResponse:
    """Answer ``request`` with ``path`` (honouring one ``Range``), zero-copy where possible.

    Plain-HTTP sends run in ``executor`` (see ``send_executor``).

    ``timeout_s`` is the sending stage of ``communication_timeout``: a peer that takes
    nothing for that long is dropped, with a ``TransferTimeout`` naming it.
    ``on_sent(nbytes, seconds)`` is called once the whole range is out, for metrics.
    """
    started = time.monotonic()
    size = (await asyncio.to_thread(path.stat)).st_size
    wanted = parse_range(request.headers.get("Range"), size)
    start, end = wanted if wanted is not None else (0, size)
    response = web.StreamResponse(status=200 if wanted is None else 206)
    response.content_type = "application/octet-stream"
    response.content_length = end - start
    response.headers["Accept-Ranges"] = "bytes"
    if wanted is not None:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    await response.prepare(request)
    if end == start:
        await response.write_eof()
        return response
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    secure = transport is not None and transport.get_extra_info("sslcontext") is not None
    what = f"{path.name} bytes {start}-{end - 1}"
    timer = ProgressTimer(timeout_s, stage=Stage.SENDING, peer=peer, what=f"sending {what}")
    try:
        async with timer:
            if sock is None or secure:
                await _write_chunks(response, path, start, end, timer)
            else:
                assert transport is not None
                # The head must be out of the transport's buffer before bytes go around
                # it. It almost always left at once (a few hundred bytes into an idle
                # socket); the transport has no "buffer empty" event to wait for.
                await response.drain()
                while transport.get_write_buffer_size():  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
                await run_stoppable(
                    executor, _sendfile_loop, sock.fileno(), path, start, end, timer.progress
                )
    except asyncio.CancelledError:
        if timer.bytes_moved >= end - start:
            # every byte was out, and the peer, done with it, hung up before this handler
            # got back from the send: the range was sent all the same
            if on_sent is not None:
                on_sent(end - start, time.monotonic() - started)
        else:
            log.info(
                "%s to %s cancelled after %d bytes (connection closed)",
                what,
                peer,
                timer.bytes_moved,
            )
        raise
    except (OSError, TransferTimeout) as exc:
        # The head is out, so no error body can follow: the peer sees a short body (it
        # fetches the range again) and the connection is closed behind it.
        log.warning("%s to %s stopped after %d bytes: %s", what, peer, timer.bytes_moved, exc)
        if transport is not None:
            transport.close()
        return response
    await response.write_eof()
    if on_sent is not None:
        on_sent(end - start, time.monotonic() - started)
    return response
