"""Weighted averaging on disk, checked against numpy's own ``np.average`` bit for bit.

Every kind of tensor: floats averaged and rounded to nearest even (16-bit ones checked
against the integer reference of ``tests.rounding``), integers and bools carried over
from the round's base model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import ModelFormatError
from common.modelio import ModelReader, ModelWriter, read_layout
from common.tensorfile import FLOAT_DTYPES, Layout, numpy_dtype
from fl_server.aggregate import Source, finalize, fold
from tests.rounding import BF16, F16, round_array

SEGMENT = 64 * 1024
TENSORS = [
    ("w", "F32", (1000, 37)),
    ("b", "F32", (37,)),
    ("h", "F16", (5, 7)),
    ("e", "F32", (0,)),
    ("bw", "BF16", (613, 7)),  # odd byte count: what follows is not 4-aligned
    ("d", "F64", (101,)),
    ("steps", "I64", (33,)),  # past 2**53: float64 would round them
    ("ids", "U16", (9, 5)),
    ("mask", "BOOL", (77,)),
    ("q", "I8", (3,)),
]
FORMATS = {"BF16": BF16, "F16": F16}


def _write(path: Path, values: dict[str, np.ndarray]) -> Path:
    with ModelWriter(path, TENSORS, segment_bytes=SEGMENT) as w:
        for name, _, _ in TENSORS:
            if values[name].size:
                w.write(values[name].reshape(-1))
        w.finish()
    return path


def _read(path: Path) -> dict[str, np.ndarray]:
    with ModelReader(path) as r:
        return {name: r.read_tensor(name) for name in r.names}


def _random(rng: np.random.Generator, st: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = numpy_dtype(st)
    if st in FLOAT_DTYPES:
        return (rng.standard_normal(shape) * 10).astype(dtype)
    if st == "BOOL":
        return rng.integers(0, 2, shape).astype(dtype)
    if st == "I64":
        return (2**62 + rng.integers(0, 2**40, shape)).astype(dtype)
    info = np.iinfo(dtype.name)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def _updates(tmp_path: Path, n: int) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """The round's base model, and ``n`` updates: new floats, its integers and bools."""
    rng = np.random.default_rng(3)
    base = {name: _random(rng, st, shape) for name, st, shape in TENSORS}
    out = []
    for k in range(n):
        upd = {
            name: _random(rng, st, shape) if st in FLOAT_DTYPES else base[name]
            for name, st, shape in TENSORS
        }
        _write(tmp_path / f"u{k}.st", upd)
        out.append(upd)
    return _write(tmp_path / "base.st", base), out


def _expected(
    base: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], weights: list[int]
) -> dict[str, np.ndarray]:
    """numpy's weighted average in float64, rounded by the reference for 16-bit floats;
    integer and bool tensors are the base model's."""
    out = {}
    for name, st, _ in TENSORS:
        if st not in FLOAT_DTYPES:
            out[name] = base[name]
            continue
        avg = np.average(
            np.stack([u[name].astype(np.float64) for u in updates]),
            axis=0,
            weights=np.asarray(weights, dtype=np.float64),
        )
        fmt = FORMATS.get(st)
        dtype = numpy_dtype(st)
        out[name] = avg.astype(dtype) if fmt is None else round_array(avg, fmt).view(dtype)
    return out


@pytest.mark.parametrize("chunk_bytes", [8, 4096, 1 << 20])
@pytest.mark.parametrize("weights", [[1, 1], [1, 3], [2, 5, 7]])
def test_fold_then_finalize_equals_numpy_average(
    tmp_path: Path, weights: list[int], chunk_bytes: int
) -> None:
    base, updates = _updates(tmp_path, len(weights))
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
    man = finalize(sources, layout, float(sum(weights)), out, SEGMENT, chunk_bytes, base=base)

    got = _read(out)
    want = _expected(_read(base), updates, weights)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert got[name].tobytes() == want[name].tobytes(), name
    assert man.file_size == out.stat().st_size
    assert man.layout == layout


def test_a_failed_fold_leaves_no_partial_file(tmp_path: Path) -> None:
    _updates(tmp_path, 1)
    layout = _layout(tmp_path)
    truncated = tmp_path / "short.st"
    cut = layout.data_offset + layout.tensor("d").end - 100  # inside the last float tensor
    truncated.write_bytes((tmp_path / "u0.st").read_bytes()[:cut])
    out = tmp_path / "acc.f64"
    with pytest.raises(ModelFormatError, match="file ends inside tensor"):
        fold([Source(tmp_path / "u0.st", 1.0), Source(truncated, 1.0)], layout, out, 4096)
    assert not out.exists() and not (tmp_path / "acc.f64.part").exists()


def test_an_accumulator_holds_the_float_tensors_only(tmp_path: Path) -> None:
    _updates(tmp_path, 2)
    layout = _layout(tmp_path)
    acc = tmp_path / "acc.f64"
    fold([Source(tmp_path / "u0.st", 1.0), Source(tmp_path / "u1.st", 2.0)], layout, acc, 4096)
    floats = sum(t.numel for t in layout.tensors if t.dtype in FLOAT_DTYPES)
    assert acc.stat().st_size == 8 * floats


def _layout(tmp_path: Path) -> Layout:
    return read_layout(tmp_path / "u0.st")
