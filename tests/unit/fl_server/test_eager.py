"""The early aggregate: whom it counts, which tensors are ready, and its file, which must
be the very bytes the plain path writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.modelio import ModelWriter, compute_manifest
from common.tensorfile import Layout, plan_layout
from common.wire import Phase, TaskState
from fl_server import eager
from fl_server.aggregate import Source, finalize
from fl_server.eager import Member
from fl_server.state import TaskRow

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
) -> TaskRow:
    return TaskRow(
        task_id=task_id,
        job_id="j",
        round=1,
        client=f"site-{task_id}",
        state=state,
        created_at=0.0,
        last_progress=0.0,
        phase=Phase.UPLOADING,
        bytes_done=0,
        bytes_total=0,
        num_samples=samples,
        metrics=None,
        digest=None,
        folded=folded,
        reason=None,
    )


def test_members_are_the_open_and_committed_tasks_with_their_weights() -> None:
    tasks = [
        _task("b", TaskState.ASSIGNED),
        _task("a", TaskState.COMMITTED, samples=3, folded=True),
        _task("c", TaskState.EXPIRED),
        _task("d", TaskState.REJECTED),
    ]
    assert eager.members_of(tasks, {"b": 5.0, "c": 1.0}) == (Member("a", 3.0), Member("b", 5.0))
    assert eager.members_of(tasks, {}) is None  # b has declared nothing yet
    # two updates folded: their spools were replaced by an accumulator
    folded = [*tasks, _task("e", TaskState.COMMITTED, samples=1, folded=True)]
    assert eager.members_of(folded, {"b": 5.0}) is None
    assert eager.members_of([_task("c", TaskState.EXPIRED)], {}) is None
    assert eager.committed_members(tasks) == (Member("a", 3.0),)


def _layout(data_offset: int = 8) -> Layout:
    layout, _ = plan_layout(TENSORS)
    return layout.model_copy(update={"data_offset": data_offset})


def test_a_tensor_is_covered_by_the_segments_holding_its_bytes() -> None:
    layout = _layout(data_offset=100)
    w, b, _, e, _, _ = layout.tensors
    assert eager.covering_segments(w, 100, SEGMENT) == range(0, 3)  # bytes 100..148099
    last_w = (100 + w.end - 1) // SEGMENT
    assert eager.covering_segments(b, 100, SEGMENT) == range(last_w, last_w + 1)
    assert eager.covering_segments(e, 100, SEGMENT) == range(0)
    assert eager.covering_segments(w, 100, 1 << 30) == range(0, 1)


def test_a_tensor_is_ready_once_every_update_holds_all_of_its_segments() -> None:
    layout = _layout()
    count = (layout.file_size + SEGMENT - 1) // SEGMENT
    everything = set(range(count))
    assert eager.ready_tensors(layout, SEGMENT, [everything, everything], set()) == list(range(6))
    assert eager.ready_tensors(layout, SEGMENT, [everything, everything], {0, 3}) == [1, 2, 4, 5]
    # one update lacks segment 1: "w" (segments 0..2) is not ready; "e" (no bytes) is
    partial = everything - {1}
    ready = eager.ready_tensors(layout, SEGMENT, [everything, partial], set())
    assert 0 not in ready and 3 in ready
    assert eager.ready_tensors(layout, SEGMENT, [set(), everything], set()) == [3]


def test_a_segment_is_complete_once_all_its_tensors_are_written() -> None:
    out, _ = plan_layout(TENSORS)
    per_segment = eager.segment_tensors(out, SEGMENT)
    assert per_segment[0] == [0]  # the header and the start of "w"
    assert 0 in per_segment[2] and 1 in per_segment[2]  # "w" ends where "b" starts
    assert all(3 not in tensors for tensors in per_segment)  # "e" has no bytes
    assert eager.complete_segments(per_segment, {0}, set()) == [0, 1]
    assert eager.complete_segments(per_segment, {0}, {0}) == [1]
    every = set(range(len(TENSORS)))
    assert eager.complete_segments(per_segment, every, set()) == list(range(len(per_segment)))


def test_a_step_takes_ready_tensors_in_order_up_to_its_size() -> None:
    big, _ = plan_layout([(f"t{i}", "F32", (eager.STEP_BYTES // 8,)) for i in range(5)])
    assert eager.next_step(big, [0, 1, 2, 3, 4]) == [0, 1]
    assert eager.next_step(big, [3]) == [3]
    huge, _ = plan_layout([("t", "F32", (eager.STEP_BYTES,)), ("u", "F32", (4,))])
    assert eager.next_step(huge, [0, 1]) == [0]  # one tensor at least, however large


def _updates(tmp_path: Path, n: int, metadata: dict[str, str] | None) -> list[Path]:
    rng = np.random.default_rng(11)
    dtypes = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "F64": np.float64}
    paths = []
    for k in range(n):
        path = tmp_path / f"u{k}.st"
        with ModelWriter(path, TENSORS, segment_bytes=SEGMENT, metadata=metadata) as w:
            for _, dt, shape in TENSORS:
                x = rng.standard_normal(shape) * 1000
                if x.size:
                    w.write(x.astype(dtypes[dt]))
            w.finish()
        paths.append(path)
    return paths


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("metadata", [None, {"origin": "a model with a longer header"}])
def test_written_in_any_order_of_steps_it_is_the_plain_aggregate_byte_for_byte(
    tmp_path: Path, n: int, metadata: dict[str, str] | None
) -> None:
    paths = _updates(tmp_path, n, metadata)
    layout = compute_manifest(paths[0], SEGMENT).layout
    sources = [Source(p, float(w)) for p, w in zip(paths, (2, 5, 1), strict=False)]
    total = sum(s.weight or 0 for s in sources)
    plain = tmp_path / "plain.st"
    want = finalize(sources, layout, total, plain, SEGMENT, 4096)

    part, out = tmp_path / "eager.part", tmp_path / "eager.st"
    order = [2, 0, 3, 1, 5, 4]  # out of file order; "w" early, so some segments complete
    state = eager.EagerRound(members=())
    for i in range(0, len(order) - 2, 2):  # the last two left for the close
        step = order[i : i + 2]
        state.digests.update(
            eager.write_step(part, layout, sources, total, step, state, SEGMENT, 4096)
        )
        state.done.update(step)
    # segments hashed early are final: they are the plain file's
    assert state.digests
    assert all(want.segment_digests[k] == d for k, d in state.digests.items())
    assert len(state.digests) < want.num_segments
    rest = order[len(order) - 2 :]
    state.digests.update(eager.write_step(part, layout, sources, total, rest, state, SEGMENT, 4096))
    got = eager.finish(part, layout, SEGMENT, state.digests, out)
    assert got == want
    assert out.read_bytes() == plain.read_bytes()
    assert not part.exists()
