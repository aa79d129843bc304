"""Writing the early aggregate: the next global model while a round's updates arrive.

What is written when, and whether the file counts at close, is decided in
``fl_server.core.early`` and ``fl_server.core.round``; here the blocking file work
(call from a thread). A step reads only acknowledged segments, which are never
overwritten, and writes the very bytes the plain path would (the same sums in float64,
the same division and cast; integer and bool tensors copied from the base model).
Segments are hashed as they become complete and the file is synced every
``SYNC_BYTES``, so at close only the tensors left are averaged, the segments left
hashed and the last part synced. The file lives in the round's folder,
which a restarted server cleans: a crash loses the early work, nothing else.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.digest import segment_count, whole_digest
from common.errors import ModelFormatError
from common.modelio import fsync_dir, hash_file_segments
from common.storage import allocate
from common.tensorfile import Layout, Manifest, plan_layout
from fl_server.aggregate import Source, write_average
from fl_server.core.early import EarlyRound, complete_segments, segment_tensors

# unsynced bytes of the early aggregate after which a step syncs: often enough that the
# close has little left to wait for, rarely enough that the steps keep up with uploads
SYNC_BYTES = 1024 * 1024 * 1024


def output_layout(layout: Layout) -> tuple[Layout, bytes]:
    """The layout and header of the next global model, as ``ModelWriter`` writes them."""
    return plan_layout([(t.name, t.dtype, t.shape) for t in layout.tensors])


def write_step(
    path: Path,
    layout: Layout,
    sources: Sequence[Source],
    total_weight: float,
    tensors: Sequence[int],
    early: EarlyRound,
    segment_bytes: int,
    chunk_bytes: int,
    stop: threading.Event | None = None,
    *,
    base: Path,
) -> tuple[dict[int, str], int]:
    """Write the average of ``tensors`` into the early aggregate at ``path`` (made, at
    the next global model's size and with its header, if missing); return the digests
    of the segments this completes and the bytes written since the last sync.

    A step syncs the file once ``SYNC_BYTES`` are written since the last sync: the sync
    at close has at most that left to wait for, not the model. Segments are hashed
    while still in the page cache. ``early`` is only read: the caller records the step.
    Integer and bool tensors are copied from ``base``, the round's global model.
    """
    out, head = output_layout(layout)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != out.file_size:
            allocate(fd, out.file_size)
            _pwrite_all(fd, head, 0)
        write_average(
            sources,
            layout,
            total_weight,
            tensors,
            fd,
            out.data_offset,
            chunk_bytes,
            stop,
            base=base,
        )
        unsynced = early.unsynced + sum(out.tensors[t].nbytes for t in tensors)
        if unsynced >= SYNC_BYTES:
            os.fdatasync(fd)
            unsynced = 0
    finally:
        os.close(fd)
    done = early.done | set(tensors)
    new = complete_segments(segment_tensors(out, segment_bytes), done, early.digests)
    return (hash_file_segments(path, segment_bytes, new) if new else {}), unsynced


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def finish(
    path: Path, layout: Layout, segment_bytes: int, digests: Mapping[int, str], dest: Path
) -> Manifest:
    """Sync the early aggregate, hash what ``digests`` lacks, and move it to ``dest``."""
    out, _ = output_layout(layout)
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size != out.file_size:
            raise ModelFormatError(f"{path} is not {out.file_size} bytes long")
        os.fsync(fd)
    finally:
        os.close(fd)
    count = segment_count(out.file_size, segment_bytes)
    missing = [i for i in range(count) if i not in digests]
    every = {**digests, **(hash_file_segments(path, segment_bytes, missing) if missing else {})}
    ordered = tuple(every[i] for i in range(count))
    os.replace(path, dest)
    fsync_dir(dest.parent)
    return Manifest(
        layout=out,
        segment_bytes=segment_bytes,
        segment_digests=ordered,
        digest=whole_digest(ordered),
    )
