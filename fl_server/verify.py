"""Checks an uploaded update must pass before it may touch the global model (blocking).

Values are checked per segment as segments arrive (whole elements inside the segment)
and, at commit, the few elements that straddle a segment boundary; together that is
every element exactly once, without a second pass over the update at commit time.
The header is checked as soon as the segment holding it arrives, so an update with
the wrong tensors is refused at its first segment, naming the tensor, rather than
after the whole upload.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.errors import ModelFormatError, UpdateRejected
from common.modelio import byte_view, read_layout
from common.tensorfile import (
    FLOAT_DTYPES,
    HEADER_LEN_BYTES,
    Layout,
    check_same_layout,
    header_length,
    parse_header,
)

CHECK_CHUNK_BYTES = 1024 * 1024


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
            vals = np.frombuffer(view[:got], dtype=spec.np_dtype)
            ok = np.isfinite(vals)
            if not ok.all():
                bad = first + int(np.argmin(ok))
                raise UpdateRejected(
                    f"tensor {spec.name!r} holds NaN or Inf (first at element {bad}); "
                    "the trainer produced invalid values",
                    field="tensors",
                )


def check_segment_values(path: Path, layout: Layout, start: int, end: int) -> None:
    buf = np.empty(CHECK_CHUNK_BYTES, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        _check_elements(fd, layout, start, end, buf)
    finally:
        os.close(fd)


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
    """At commit: the header matches the task's model, and boundary elements are finite."""
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
