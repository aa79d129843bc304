"""Weighted averaging on disk, checked against numpy's own ``np.average`` bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.errors import ModelFormatError
from common.modelio import ModelWriter, read_layout
from common.tensorfile import Layout
from fl_server.aggregate import Source, finalize, fold

SEGMENT = 64 * 1024
TENSORS = [("w", "F32", (1000, 37)), ("b", "F32", (37,)), ("h", "F16", (5, 7)), ("e", "F32", (0,))]


def _write(path: Path, values: dict[str, np.ndarray]) -> Path:
    with ModelWriter(path, TENSORS, segment_bytes=SEGMENT) as w:
        for name, _, _ in TENSORS:
            if values[name].size:
                w.write(values[name])
        w.finish()
    return path


def _updates(tmp_path: Path, n: int) -> list[dict[str, np.ndarray]]:
    dtypes = {"F32": np.float32, "F16": np.float16}
    rng = np.random.default_rng(3)
    out = []
    for k in range(n):
        upd = {name: rng.standard_normal(shape).astype(dtypes[dt]) for name, dt, shape in TENSORS}
        _write(tmp_path / f"u{k}.st", upd)
        out.append(upd)
    return out


def _expected(updates: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    return {
        name: np.average(
            np.stack([u[name].astype(np.float64) for u in updates]),
            axis=0,
            weights=np.asarray(weights, dtype=np.float64),
        ).astype(updates[0][name].dtype)
        for name, _, _ in TENSORS
    }


@pytest.mark.parametrize("chunk_bytes", [8, 4096, 1 << 20])
@pytest.mark.parametrize("weights", [[1, 1], [1, 3], [2, 5, 7]])
def test_fold_then_finalize_equals_numpy_average(
    tmp_path: Path, weights: list[int], chunk_bytes: int
) -> None:
    updates = _updates(tmp_path, len(weights))
    layout = _layout(tmp_path)
    # the way the runner goes: first update stays where it is, the next ones fold in
    sources = [Source(tmp_path / "u0.st", float(weights[0]))]
    for k in range(1, len(weights) - 1):
        acc = tmp_path / f"acc-{k}.f64"
        fold([*sources, Source(tmp_path / f"u{k}.st", float(weights[k]))], layout, acc, chunk_bytes)
        sources = [Source(acc, None)]
        assert not (tmp_path / f"acc-{k}.f64.part").exists()
    last = len(weights) - 1
    sources.append(Source(tmp_path / f"u{last}.st", float(weights[last])))
    out = tmp_path / "global.st"
    man = finalize(sources, layout, float(sum(weights)), out, SEGMENT, chunk_bytes)

    got = load_file(str(out))
    want = _expected(updates, weights)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert man.file_size == out.stat().st_size
    assert man.layout == layout


def test_a_failed_fold_leaves_no_partial_file(tmp_path: Path) -> None:
    _updates(tmp_path, 1)
    layout = _layout(tmp_path)
    truncated = tmp_path / "short.st"
    truncated.write_bytes((tmp_path / "u0.st").read_bytes()[:-100])
    out = tmp_path / "acc.f64"
    with pytest.raises(ModelFormatError, match="file ends inside tensor"):
        fold([Source(tmp_path / "u0.st", 1.0), Source(truncated, 1.0)], layout, out, 4096)
    assert not out.exists() and not (tmp_path / "acc.f64.part").exists()


def _layout(tmp_path: Path) -> Layout:
    return read_layout(tmp_path / "u0.st")
