"""Downloading a task's model, segment by segment, resumable.

Each segment is one HTTP range request, written straight to its offset in
``<model>.part`` through ``common.streams``; its digest is checked against the task's
manifest and the segment is recorded in a journal file (``partfile``). After a broken
connection or a restart only segments not in the journal are fetched again; the
journal's segments are re-hashed from disk once per process (``Verified``), not on
every retry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from common.http_client import map_transport_errors, raise_for_error
from common.modelio import hash_file_segments
from common.segments import Segments, check_fetched, check_range_reply, journal_claims
from common.streams import body_pieces, receive_segment
from common.tensorfile import Manifest
from common.timeouts import Stage
from fl_client.site import partfile
from fl_client.site.metrics import Direction
from fl_client.site.unjoined import run_unjoined
from fl_client.site.window import TransferContext

log = logging.getLogger("fl_client.transfer")


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
