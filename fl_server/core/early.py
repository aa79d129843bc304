"""Planning the early aggregate: whom it counts and which tensors are ready.

Why. The next global model can only be complete once every update is in, but most of
it can be written before: a tensor can be averaged as soon as every update of the round
holds the segments that cover it. Done then, it reads spool bytes that were just
written (still in the page cache) and runs while the sites are still sending.

Safety. The work is speculative: it is made with the round's assigned and committed
tasks of the moment and the weights the sites declared on their segments (committed
ones use the committed weight). At close it is used only if the committed updates and
weights are exactly the ones it was made with (``committed_members``); otherwise it is
dropped and the round aggregates from the spools. The file work is in
``fl_server.eager``; here only values.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from common.digest import segment_count
from common.tensorfile import Layout, TensorSpec
from common.wire import TaskState

# the tensors averaged in one step of the round's loop, at least one: small enough that
# the loop looks at its timeouts and new segments often
STEP_BYTES = 256 * 1024 * 1024


class TaskLike(Protocol):
    @property
    def task_id(self) -> str: ...
    @property
    def state(self) -> TaskState: ...
    @property
    def weight(self) -> float | None: ...
    @property
    def folded(self) -> bool: ...


@dataclass(frozen=True)
class Member:
    """An update the early aggregate counts, with its weight."""

    task_id: str
    weight: float


@dataclass
class EarlyRound:
    """The early aggregate of one round: whom it counts, and the tensors written."""

    members: tuple[Member, ...]
    done: set[int] = field(default_factory=set)
    digests: dict[int, str] = field(default_factory=dict)  # of the complete segments
    unsynced: int = 0  # bytes written since the file was last synced

    @property
    def total_weight(self) -> float:
        return sum(m.weight for m in self.members)


def members_of(
    tasks: Iterable[TaskLike], declared: Mapping[str, float]
) -> tuple[Member, ...] | None:
    """The updates the round's aggregate is made of if every assigned task commits with
    the weight it declared, in task-id order; None when that cannot be known yet (an
    assigned task declared no weight) or the early aggregate cannot be made (no task, or
    updates already folded into an accumulator, whose spools are gone)."""
    members = []
    folded = 0
    for t in tasks:
        folded += t.folded
        if t.state is TaskState.COMMITTED:
            weight = t.weight
        elif t.state is TaskState.ASSIGNED:
            weight = declared.get(t.task_id)
        else:
            continue  # expired or rejected: not part of the aggregate
        if weight is None:
            return None
        members.append(Member(t.task_id, weight))
    if not members or folded > 1:
        return None
    return tuple(sorted(members, key=lambda m: m.task_id))


def committed_members(tasks: Iterable[TaskLike]) -> tuple[Member, ...]:
    """The updates a closing round is made of, in the form ``members_of`` gives."""
    return tuple(
        sorted(
            (Member(t.task_id, t.weight or 0.0) for t in tasks if t.state is TaskState.COMMITTED),
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
