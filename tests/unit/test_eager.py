"""The early aggregate: whom it counts, which tensors are ready, and its file, which must
be the very bytes the plain path writes."""

from __future__ import annotations

import random
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
    order = list(range(len(layout.tensors)))
    random.Random(n).shuffle(order)
    for i in range(0, len(order), 2):
        eager.write_step(part, layout, sources, total, order[i : i + 2], 4096)
    got = eager.finish(part, layout, SEGMENT, out)
    assert got == want
    assert out.read_bytes() == plain.read_bytes()
    assert not part.exists()
