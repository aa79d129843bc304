"""Unit tests for fl_server.verify: NaN/Inf found in received bytes as on disk, and
integer and bool tensors that differ from the round's global model."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from common.errors import UpdateRejected
from common.modelio import ModelWriter, byte_view
from common.tensorfile import Layout
from fl_server.verify import SegmentValues, _check_elements

TENSORS = [
    ("h", "F16", (37,)),
    ("count", "I32", (5,)),
    ("w", "F32", (9, 7)),
    ("b", "F64", (11,)),
    ("mask", "BOOL", (3,)),
    ("bw", "BF16", (13,)),
    ("v", "F32", (29,)),
    ("step", "I64", (4,)),
]


def _model(path: Path, bad: list[tuple[str, int, float]]) -> Layout:
    rng = np.random.default_rng(3)
    with ModelWriter(path, TENSORS, segment_bytes=64) as w:
        for name, _, _ in TENSORS:
            spec = w.layout.tensor(name)
            values = rng.standard_normal(spec.numel).astype(spec.np_dtype)
            for tensor, index, value in bad:
                if tensor == name:
                    values[index] = value
            w.write(values)
        return w.finish().layout


def _read_back(path: Path, layout: Layout, start: int, end: int) -> str | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _check_elements(fd, layout, start, end, np.empty(16, dtype=np.uint8))
    except UpdateRejected as exc:
        return str(exc)
    finally:
        os.close(fd)
    return None


def _received(
    data: bytes, layout: Layout, start: int, end: int, cuts: list[int], base: Path
) -> str | None:
    values = SegmentValues(layout, start, end, base)
    edges = [start, *sorted(c for c in cuts if start < c < end), end]
    for lo, hi in itertools.pairwise(edges):
        values.feed(memoryview(data[lo:hi]))
    return values.problem


@pytest.mark.parametrize(
    "bad",
    [
        [],
        [("h", 36, np.inf)],
        [("w", 0, np.nan)],
        [("w", 40, -np.inf), ("b", 2, np.nan)],
        [("b", 10, np.inf)],
        [("v", 28, np.nan)],
        [("v", 3, np.nan), ("h", 20, np.inf)],
        [("bw", 0, np.nan)],
        [("bw", 12, -np.inf), ("v", 1, np.nan)],
    ],
)
def test_received_pieces_find_what_reading_back_finds(
    tmp_path: Path, bad: list[tuple[str, int, float]]
) -> None:
    path = tmp_path / "u.st"
    layout = _model(path, bad)
    data = path.read_bytes()
    rng = np.random.default_rng(len(bad))
    seen = set()
    ranges = [(0, len(data))] + [
        tuple(sorted(int(x) for x in rng.integers(0, len(data) + 1, size=2))) for _ in range(300)
    ]
    for start, end in ranges:
        # pieces from 1 byte (an element over several pieces) to whole segments
        cuts = [int(c) for c in rng.integers(start, end + 1, size=int(rng.integers(0, 40)))]
        want = _read_back(path, layout, start, end)
        assert _received(data, layout, start, end, cuts, path) == want, (start, end, cuts)
        seen.add(want)
    if bad:
        assert len(seen) > 1, "no range held a bad value and none missed one"


def test_a_nan_split_over_one_byte_pieces_is_named(tmp_path: Path) -> None:
    path = tmp_path / "u.st"
    layout = _model(path, [("b", 4, np.nan)])
    data = path.read_bytes()
    spec = layout.tensor("b")
    at = layout.data_offset + spec.begin + 4 * 8
    problem = _received(data, layout, 0, len(data), list(range(at - 3, at + 9)), path)
    assert problem is not None and "tensor 'b' holds NaN or Inf (first at element 4)" in problem


def test_bytes_are_not_read_for_integer_tensors(tmp_path: Path) -> None:
    path = tmp_path / "u.st"
    layout = _model(path, [])
    data = bytearray(path.read_bytes())
    spec = layout.tensor("count")
    nan32 = byte_view(np.array([np.nan], dtype=np.float32)).tobytes()
    at = layout.data_offset + spec.begin
    data[at : at + 4] = nan32  # an int32 whose bits would be a float NaN
    base = tmp_path / "base.st"  # the round's model holds it too: it is carried as it is
    base.write_bytes(data)
    assert _received(bytes(data), layout, 0, len(data), [at + 2], base) is None


def test_a_nan_in_bf16_is_named(tmp_path: Path) -> None:
    path = tmp_path / "u.st"
    layout = _model(path, [("bw", 7, np.nan)])
    data = path.read_bytes()
    problem = _received(data, layout, 0, len(data), [], path)
    assert problem == (
        "tensor 'bw' holds NaN or Inf (first at element 7); the trainer produced invalid values"
    )


@pytest.mark.parametrize(
    ("name", "element", "byte"), [("count", 3, 1), ("step", 2, 7), ("mask", 2, 0)]
)
def test_a_changed_integer_or_bool_tensor_is_named(
    tmp_path: Path, name: str, element: int, byte: int
) -> None:
    base = tmp_path / "base.st"
    layout = _model(base, [])
    data = bytearray(base.read_bytes())
    spec = layout.tensor(name)
    at = layout.data_offset + spec.begin + element * spec.np_dtype.itemsize + byte
    data[at] ^= 0x01
    want = (
        f"tensor {name!r} differs from the round's global model (first at element {element}): "
        f"{spec.dtype} tensors are not averaged, every update must carry them unchanged"
    )
    # received whole, in one-byte pieces, and in segments whose edge cuts the element
    assert _received(bytes(data), layout, 0, len(data), [], base) == want
    assert _received(bytes(data), layout, 0, len(data), list(range(len(data))), base) == want
    assert _received(bytes(data), layout, at, len(data), [at + 1], base) == want
    assert _received(bytes(data), layout, 0, at + 1, [at], base) == want
    # segments without the changed byte pass
    assert _received(bytes(data), layout, 0, at, [], base) is None
    assert _received(bytes(data), layout, at + 1, len(data), [], base) is None
