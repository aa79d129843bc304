"""Aggregating a round while its updates still arrive.

Why. The next global model can only be complete once every update is in, but most of
it can be written before: a tensor can be averaged as soon as every update of the round
holds the segments that cover it. Done then, it reads spool bytes that were just
written (still in the page cache, where a round of a large model would otherwise read
them back from disk), and it runs while the sites are still sending, instead of after,
while every site waits. Segments are hashed as they become complete and the file is
synced every ``SYNC_BYTES``, so at close only the tensors left are averaged, the
segments left hashed and the last part synced.

Safety. The work is speculative: it is made with the round's open and committed tasks
of the moment and the weights the sites declared on their segments (committed ones use
the committed weight). It reads only acknowledged segments, which are never
overwritten. At close the file is used only if the committed updates and weights are
exactly the ones it was made with, in which case it holds the very bytes the plain
path would write (the same sums in float64, the same division and cast); otherwise it is
dropped and the round aggregates from the spools as before. The file lives in the
round's folder, which a restarted server cleans: a crash loses the early work, nothing
else.

Pure planning here (which tasks, which tensors); the file work, blocking, at the end.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.digest import segment_count, whole_digest
from common.errors import ModelFormatError
from common.modelio import fsync_dir, hash_file_segments
from common.storage import allocate
from common.tensorfile import Layout, Manifest, TensorSpec, plan_layout
from common.wire import TaskState
from fl_server.aggregate import Source, write_average
from fl_server.state import TaskRow

# unsynced bytes of the early aggregate after which a step syncs: often enough that the
# close has little left to wait for, rarely enough that the steps keep up with uploads
SYNC_BYTES = 1024 * 1024 * 1024

# the tensors averaged in one step of the round's loop, at least one: small enough that
# the loop looks at its timeouts and new segments often
STEP_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Member:
    """An update the early aggregate counts, with its weight."""

    task_id: str
    weight: float


@dataclass
class EagerRound:
    """The early aggregate of one round: whom it counts, and the tensors written."""

    members: tuple[Member, ...]
    done: set[int] = field(default_factory=set)
    digests: dict[int, str] = field(default_factory=dict)  # of the complete segments
    unsynced: int = 0  # bytes written since the last sync

    @property
    def total_weight(self) -> float:
        return sum(m.weight for m in self.members)


def members_of(
    tasks: Sequence[TaskRow], declared: Mapping[str, float]
) -> tuple[Member, ...] | None:
    """The updates the round's aggregate is made of if every open task commits with the
    weight it declared, in task-id order; None when that cannot be known yet (an open
    task declared no weight) or the early aggregate cannot be made (no task, or updates
    already folded into an accumulator, whose spools are gone)."""
    members = []
    for t in tasks:
        if t.state is TaskState.COMMITTED:
            assert t.num_samples is not None
            weight: float | None = float(t.num_samples)
        elif t.state is TaskState.ASSIGNED:
            weight = declared.get(t.task_id)
        else:
            continue  # expired or rejected: not part of the aggregate
        if weight is None:
            return None
        members.append(Member(t.task_id, weight))
    if not members or sum(t.folded for t in tasks) > 1:
        return None
    return tuple(sorted(members, key=lambda m: m.task_id))


def committed_members(tasks: Sequence[TaskRow]) -> tuple[Member, ...]:
    """The updates a closing round is made of, in the form ``members_of`` gives."""
    return tuple(
        sorted(
            (
                Member(t.task_id, float(t.num_samples or 0))
                for t in tasks
                if t.state is TaskState.COMMITTED
            ),
            key=lambda m: m.task_id,
        )
    )


def covering_segments(spec: TensorSpec, data_offset: int, segment_bytes: int) -> range:
    """The segments holding any byte of the tensor (none for a zero-size tensor)."""
    if spec.nbytes == 0:
        return range(0)
    first = (data_offset + spec.begin) // segment_bytes
    last = (data_offset + spec.end - 1) // segment_bytes
    return range(first, last + 1)


def ready_tensors(
    layout: Layout, segment_bytes: int, held: Sequence[Collection[int]], done: Collection[int]
) -> list[int]:
    """Indices of the tensors not written yet whose bytes every update already holds."""
    return [
        i
        for i, spec in enumerate(layout.tensors)
        if i not in done
        and all(
            all(s in h for s in covering_segments(spec, layout.data_offset, segment_bytes))
            for h in held
        )
    ]


def next_step(layout: Layout, ready: Sequence[int]) -> list[int]:
    """The ready tensors to write in one step: in order, about ``STEP_BYTES`` of them."""
    step: list[int] = []
    size = 0
    for i in ready:
        if step and size >= STEP_BYTES:
            break
        step.append(i)
        size += layout.tensors[i].nbytes
    return step


def output_layout(layout: Layout) -> tuple[Layout, bytes]:
    """The layout and header of the next global model, as ``ModelWriter`` writes them."""
    return plan_layout([(t.name, t.dtype, t.shape) for t in layout.tensors])


# blocking file work: call from a thread


def segment_tensors(out: Layout, segment_bytes: int) -> list[list[int]]:
    """For each segment of the output file, the tensors with bytes in it."""
    segments: list[list[int]] = [[] for _ in range(segment_count(out.file_size, segment_bytes))]
    for i, spec in enumerate(out.tensors):
        for s in covering_segments(spec, out.data_offset, segment_bytes):
            segments[s].append(i)
    return segments


def complete_segments(
    per_segment: Sequence[Sequence[int]], done: Collection[int], hashed: Collection[int]
) -> list[int]:
    """Segments not hashed yet whose every byte is final: all their tensors are written
    (the header is, from the start)."""
    return [
        s
        for s, tensors in enumerate(per_segment)
        if s not in hashed and all(t in done for t in tensors)
    ]


# blocking file work: call from a thread


def write_step(
    path: Path,
    layout: Layout,
    sources: Sequence[Source],
    total_weight: float,
    tensors: Sequence[int],
    state: EagerRound,
    segment_bytes: int,
    chunk_bytes: int,
    stop: threading.Event | None = None,
) -> dict[int, str]:
    """Write the average of ``tensors`` into the early aggregate at ``path`` (made, at
    the next global model's size and with its header, if missing); return the digests
    of the segments this completes.

    A step syncs the file once ``SYNC_BYTES`` are written since the last sync (it then
    sets ``state.unsynced`` to 0): the sync at close has at most that left to wait
    for, not the model. Segments are hashed while still in the page cache.
    """
    out, head = output_layout(layout)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != out.file_size:
            allocate(fd, out.file_size)
            _pwrite_all(fd, head, 0)
        write_average(
            sources, layout, total_weight, tensors, fd, out.data_offset, chunk_bytes, stop
        )
        state.unsynced += sum(out.tensors[t].nbytes for t in tensors)
        if state.unsynced >= SYNC_BYTES:
            os.fdatasync(fd)
            state.unsynced = 0
    finally:
        os.close(fd)
    done = set(state.done) | set(tensors)
    new = complete_segments(segment_tensors(out, segment_bytes), done, state.digests)
    return hash_file_segments(path, segment_bytes, new) if new else {}


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
