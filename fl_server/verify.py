"""Checks an uploaded update must pass before it may touch the global model (blocking).

Float values (F64, F32, F16, BF16) must be finite. They are checked per segment in the
bytes as they arrive (``SegmentValues``: whole elements inside the segment) and, at
commit, the few elements that straddle a segment boundary; together that is every
element exactly once, and the update is never read back for it.

Integer and bool tensors are not averaged (``fl_server.aggregate``): an update must
carry them exactly as the round's global model holds them. The update is laid out as
that model, so ``SegmentValues`` compares each of their bytes in the segment with the
model's bytes at the same file offset; a byte needs no neighbours, so nothing of them
is left for the commit.
The header is checked as soon as the segment holding it arrives, so an update with
the wrong tensors is refused at its first segment, naming the tensor, rather than
after the whole upload.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.errors import ModelFormatError, UpdateRejected
from common.modelio import byte_view, read_layout
from common.tensorfile import (
    FLOAT_DTYPES,
    HEADER_LEN_BYTES,
    Layout,
    TensorSpec,
    check_same_layout,
    header_length,
    parse_header,
)


def _bad_values(spec: TensorSpec, first: int, vals: npt.NDArray[np.generic]) -> str | None:
    """Why elements ``first..`` of ``spec`` may not be averaged, or None if they may."""
    ok = np.isfinite(vals)
    if ok.all():
        return None
    bad = first + int(np.argmin(ok))
    return (
        f"tensor {spec.name!r} holds NaN or Inf (first at element {bad}); "
        "the trainer produced invalid values"
    )


# bytes of the round's global model read at a time to compare carried tensors with
COMPARE_BYTES = 64 * 1024


def _carried_change(fd: int, spec: TensorSpec, a0: int, at: int, got: memoryview) -> str | None:
    """Why the update's bytes ``got`` at file offset ``at``, inside carried tensor
    ``spec`` (which starts at ``a0``), may not be taken, or None if they are those of
    the round's global model, open at ``fd``."""
    want = np.empty(min(got.nbytes, COMPARE_BYTES), dtype=np.uint8)
    for off in range(0, got.nbytes, want.nbytes):
        part = np.frombuffer(got[off : off + want.nbytes], dtype=np.uint8)
        view = want[: part.nbytes]
        if os.preadv(fd, [byte_view(view)], at + off) != part.nbytes:
            raise ModelFormatError(f"the round's global model ends inside tensor {spec.name!r}")
        diff = part != view
        if diff.any():
            element = (at + off + int(np.argmax(diff)) - a0) // spec.np_dtype.itemsize
            return (
                f"tensor {spec.name!r} differs from the round's global model (first at "
                f"element {element}): {spec.dtype} tensors are not averaged, every update "
                "must carry them unchanged"
            )
    return None


def _check_elements(fd: int, layout: Layout, lo: int, hi: int, buf: np.ndarray) -> None:
    """Reject NaN/Inf among the whole float elements lying in file bytes [lo, hi)."""
    for spec in layout.tensors:
        if spec.dtype not in FLOAT_DTYPES:
            continue
        a0 = layout.data_offset + spec.begin
        a1 = layout.data_offset + spec.end
        s, e = max(lo, a0), min(hi, a1)
        if s >= e:
            continue
        isz = spec.np_dtype.itemsize
        k0 = -(-(s - a0) // isz)
        k1 = (e - a0) // isz
        step = len(buf) // isz
        for first in range(k0, k1, step):
            n = min(step, k1 - first)
            view = byte_view(buf)[: n * isz]
            got = os.preadv(fd, [view], a0 + first * isz)
            problem = _bad_values(spec, first, np.frombuffer(view[:got], dtype=spec.np_dtype))
            if problem is not None:
                raise UpdateRejected(problem, field="tensors")


class SegmentValues:
    """NaN/Inf among the whole float elements of file bytes [start, end), and integer
    or bool bytes that differ from the round's global model ``base``, found in the
    bytes of the segment as they are received, so the update is never read back.

    ``feed`` takes the segment's bytes in order, in pieces of any size; an element split
    between pieces is put together from the few bytes kept of the previous ones. The
    first problem is kept in ``problem`` rather than raised: a segment damaged in flight
    must come out as a digest mismatch (sent again), not as the trainer's invalid values.
    Elements across the segment's own ends are ``check_update``'s, at commit.
    """

    _KEEP = 7  # bytes of an element (at most 8) that can lie before a piece

    def __init__(self, layout: Layout, start: int, end: int, base: Path) -> None:
        inside = [
            (a0, max(a0, start), min(a1, end), spec)
            for spec in layout.tensors
            for a0, a1 in [(layout.data_offset + spec.begin, layout.data_offset + spec.end)]
            if max(a0, start) < min(a1, end)
        ]
        self._tensors = [t for t in inside if t[3].averaged]
        self._carried = [t for t in inside if not t[3].averaged]
        self._base = base
        self._pos = start
        self._tail = b""
        self.problem: str | None = None

    def feed(self, data: memoryview) -> None:
        pos, stop = self._pos, self._pos + data.nbytes
        for a0, lo, hi, spec in self._tensors:
            if self.problem is not None:
                break
            isz = spec.np_dtype.itemsize
            split = a0 + (pos - a0) // isz * isz  # start of the element holding ``pos``
            if lo <= split < pos and split + isz <= min(hi, stop):
                # an element begun in earlier pieces and complete with this one
                head = self._tail[len(self._tail) - (pos - split) :]
                raw = head + bytes(data[: split + isz - pos])
                vals = np.frombuffer(raw, dtype=spec.np_dtype)
                self.problem = _bad_values(spec, (split - a0) // isz, vals)
            k0 = -(-(max(pos, lo) - a0) // isz)
            k1 = (min(stop, hi) - a0) // isz
            if k1 > k0:
                whole = data[a0 + k0 * isz - pos : a0 + k1 * isz - pos]
                self.problem = self.problem or _bad_values(
                    spec, k0, np.frombuffer(whole, dtype=spec.np_dtype)
                )
        carried = [
            (a0, max(pos, lo), min(stop, hi), spec)
            for a0, lo, hi, spec in self._carried
            if max(pos, lo) < min(stop, hi)
        ]
        if carried and self.problem is None:
            fd = os.open(self._base, os.O_RDONLY)  # only for pieces holding carried bytes
            try:
                for a0, s, e, spec in carried:
                    got = data[s - pos : e - pos]
                    self.problem = self.problem or _carried_change(fd, spec, a0, s, got)
            finally:
                os.close(fd)
        self._tail = (self._tail + bytes(data[-self._KEEP :]))[-self._KEEP :]
        self._pos = stop


def check_header_early(path: Path, expected: Layout, received: int) -> None:
    """Check the update's header now if it lies within its first ``received`` bytes.

    A header that reaches further is checked at commit by ``check_update``.
    """
    with open(path, "rb") as f:
        prefix = f.read(min(received, HEADER_LEN_BYTES))
        try:
            n = header_length(prefix)
        except ModelFormatError as exc:
            raise UpdateRejected(
                f"update is not a valid model file: {exc}", field="header"
            ) from None
        if HEADER_LEN_BYTES + n > received:
            return
        head = prefix + f.read(n)
    try:
        got = parse_header(head, file_size=None)
    except ModelFormatError as exc:
        raise UpdateRejected(f"update is not a valid model file: {exc}", field="header") from None
    check_same_layout(got, expected)


def check_update(path: Path, expected: Layout, segment_bytes: int) -> None:
    """At commit: the header matches the task's model, and boundary elements are finite
    (carried tensors were compared whole, segment by segment, in ``SegmentValues``)."""
    try:
        got = read_layout(path)
    except Exception as exc:  # ModelFormatError, or garbage that fails to decode
        raise UpdateRejected(f"update is not a valid model file: {exc}", field="header") from None
    check_same_layout(got, expected)
    buf = np.empty(64, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        for boundary in range(segment_bytes, expected.file_size, segment_bytes):
            _check_elements(fd, expected, boundary - 8, boundary + 8, buf)
    finally:
        os.close(fd)
