"""Planning the early aggregate: whom it counts, which tensors are ready, which segments
are complete."""

from __future__ import annotations

from common.tensorfile import Layout, plan_layout
from common.wire import TaskState
from fl_server.core import early
from fl_server.core.early import Member
from fl_server.core.round_events import TaskInfo

SEGMENT = 64 * 1024
TENSORS = [
    ("w", "F32", (1000, 37)),  # crosses segment boundaries
    ("b", "F32", (37,)),
    ("h", "F16", (5, 7)),  # odd byte count: what follows is not 4-aligned
    ("e", "F32", (0,)),
    ("q", "I32", (17, 3)),
    ("z", "F64", (9000,)),
]


def _task(
    task_id: str, state: TaskState, *, samples: int | None = None, folded: bool = False
) -> TaskInfo:
    weight = None if samples is None else float(samples)
    return TaskInfo(task_id, f"site-{task_id}", state, 0.0, weight, folded)


def test_members_are_the_open_and_committed_tasks_with_their_weights() -> None:
    tasks = [
        _task("b", TaskState.ASSIGNED),
        _task("a", TaskState.COMMITTED, samples=3, folded=True),
        _task("c", TaskState.EXPIRED),
        _task("d", TaskState.REJECTED),
    ]
    assert early.members_of(tasks, {"b": 5.0, "c": 1.0}) == (Member("a", 3.0), Member("b", 5.0))
    assert early.members_of(tasks, {}) is None  # b has declared nothing yet
    # two updates folded: their spools were replaced by an accumulator
    folded = [*tasks, _task("e", TaskState.COMMITTED, samples=1, folded=True)]
    assert early.members_of(folded, {"b": 5.0}) is None
    assert early.members_of([_task("c", TaskState.EXPIRED)], {}) is None
    assert early.committed_members(tasks) == (Member("a", 3.0),)


def _layout(data_offset: int = 8) -> Layout:
    layout, _ = plan_layout(TENSORS)
    return layout.model_copy(update={"data_offset": data_offset})


def test_a_tensor_is_covered_by_the_segments_holding_its_bytes() -> None:
    layout = _layout(data_offset=100)
    w, b, _, e, _, _ = layout.tensors
    assert early.covering_segments(w, 100, SEGMENT) == range(0, 3)  # bytes 100..148099
    last_w = (100 + w.end - 1) // SEGMENT
    assert early.covering_segments(b, 100, SEGMENT) == range(last_w, last_w + 1)
    assert early.covering_segments(e, 100, SEGMENT) == range(0)
    assert early.covering_segments(w, 100, 1 << 30) == range(0, 1)


def test_a_tensor_is_ready_once_every_update_holds_all_of_its_segments() -> None:
    layout = _layout()
    count = (layout.file_size + SEGMENT - 1) // SEGMENT
    everything = set(range(count))
    assert early.ready_tensors(layout, SEGMENT, [everything, everything], set()) == list(range(6))
    assert early.ready_tensors(layout, SEGMENT, [everything, everything], {0, 3}) == [1, 2, 4, 5]
    # one update lacks segment 1: "w" (segments 0..2) is not ready; "e" (no bytes) is
    partial = everything - {1}
    ready = early.ready_tensors(layout, SEGMENT, [everything, partial], set())
    assert 0 not in ready and 3 in ready
    assert early.ready_tensors(layout, SEGMENT, [set(), everything], set()) == [3]


def test_a_segment_is_complete_once_all_its_tensors_are_written() -> None:
    out, _ = plan_layout(TENSORS)
    per_segment = early.segment_tensors(out, SEGMENT)
    assert per_segment[0] == [0]  # the header and the start of "w"
    assert 0 in per_segment[2] and 1 in per_segment[2]  # "w" ends where "b" starts
    assert all(3 not in tensors for tensors in per_segment)  # "e" has no bytes
    assert early.complete_segments(per_segment, {0}, set()) == [0, 1]
    assert early.complete_segments(per_segment, {0}, {0}) == [1]
    every = set(range(len(TENSORS)))
    assert early.complete_segments(per_segment, every, set()) == list(range(len(per_segment)))


def test_a_step_takes_ready_tensors_in_order_up_to_its_size() -> None:
    big, _ = plan_layout([(f"t{i}", "F32", (early.STEP_BYTES // 8,)) for i in range(5)])
    assert early.next_step(big, [0, 1, 2, 3, 4]) == [0, 1]
    assert early.next_step(big, [3]) == [3]
    huge, _ = plan_layout([("t", "F32", (early.STEP_BYTES,)), ("u", "F32", (4,))])
    assert early.next_step(huge, [0, 1]) == [0]  # one tensor at least, however large
