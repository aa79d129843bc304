"""The early aggregate's file: the very bytes the plain path writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.modelio import ModelReader, ModelWriter, compute_manifest
from fl_server import eager
from fl_server.aggregate import Source, finalize
from fl_server.core.early import EarlyRound
from tests.unit.fl_server.core.test_early import SEGMENT, TENSORS


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
    *paths, base = _updates(tmp_path, n + 1, metadata)  # the last one is the round's model
    layout = compute_manifest(paths[0], SEGMENT).layout
    sources = [Source(p, float(w)) for p, w in zip(paths, (2, 5, 1), strict=False)]
    total = sum(s.weight or 0 for s in sources)
    plain = tmp_path / "plain.st"
    want = finalize(sources, layout, total, plain, SEGMENT, 4096, base=base)

    part, out = tmp_path / "eager.part", tmp_path / "eager.st"
    order = [2, 0, 3, 1, 5, 4]  # out of file order; "w" early, so some segments complete
    state = EarlyRound(members=())
    for i in range(0, len(order) - 2, 2):  # the last two left for the close
        step = order[i : i + 2]
        digests, state.unsynced = eager.write_step(
            part, layout, sources, total, step, state, SEGMENT, 4096, base=base
        )
        state.digests.update(digests)
        state.done.update(step)
    # segments hashed early are final: they are the plain file's
    assert state.digests
    assert all(want.segment_digests[k] == d for k, d in state.digests.items())
    assert len(state.digests) < want.num_segments
    rest = order[len(order) - 2 :]
    digests, _ = eager.write_step(
        part, layout, sources, total, rest, state, SEGMENT, 4096, base=base
    )
    state.digests.update(digests)
    got = eager.finish(part, layout, SEGMENT, state.digests, out)
    assert got == want
    assert out.read_bytes() == plain.read_bytes()
    assert not part.exists()
    # the integer tensor is the base model's, not an average of the updates
    with ModelReader(out) as got_model, ModelReader(base) as base_model:
        np.testing.assert_array_equal(got_model.read_tensor("q"), base_model.read_tensor("q"))
