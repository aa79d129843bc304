"""Weighted averaging on disk, one bounded chunk at a time (blocking: run in a thread).

The accumulator holds sum(w_i * x_i) in float64, tensor after tensor in model order.
Each fold reads the previous accumulator version and the update and writes the next
version (``acc-{n}`` -> ``acc-{n+1}``), so a crash mid-fold leaves the last recorded
version intact and the fold is simply redone. ``finalize`` divides by the total weight
and writes the next global model in the model's dtype. With integer weights,
``w * x`` of a float32 value is exact in float64, so the result equals numpy's
``average(..., weights=...)`` computed in float64 and cast back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.modelio import ModelReader, ModelWriter, fsync_dir
from common.tensorfile import Layout, Manifest, TensorSpec, element_window

ACC_DTYPE = np.dtype("<f8")


def _acc_offsets(layout: Layout) -> list[tuple[TensorSpec, int]]:
    out, pos = [], 0
    for spec in layout.tensors:
        out.append((spec, pos))
        pos += spec.numel * ACC_DTYPE.itemsize
    return out


def _pread_into(fd: int, out: np.ndarray, pos: int) -> None:
    view = memoryview(out).cast("B")
    while view.nbytes:
        n = os.preadv(fd, [view], pos)
        if n == 0:
            raise OSError(f"accumulator ends early at byte {pos}")
        view, pos = view[n:], pos + n


def fold(
    update: Path,
    layout: Layout,
    acc_in: Path | None,
    acc_out: Path,
    weight: float,
    chunk_bytes: int,
) -> None:
    """Write ``acc_out = acc_in + weight * update`` (``acc_in`` None: start from zero)."""
    step = max(1, chunk_bytes // ACC_DTYPE.itemsize)
    scratch = np.empty(step * ACC_DTYPE.itemsize, dtype=np.uint8)
    term = np.empty(step, dtype=ACC_DTYPE)
    acc = np.empty(step, dtype=ACC_DTYPE)
    tmp = acc_out.with_name(acc_out.name + ".part")
    in_fd = os.open(acc_in, os.O_RDONLY) if acc_in is not None else -1
    try:
        with ModelReader(update, layout) as reader, open(tmp, "wb") as out:
            for spec, acc_pos in _acc_offsets(layout):
                per = min(step, element_window(spec, chunk_bytes))
                for first in range(0, spec.numel, per):
                    n = min(per, spec.numel - first)
                    u = scratch[: n * spec.np_dtype.itemsize].view(spec.np_dtype)
                    reader.read_into(spec, first, u)
                    t = term[:n]
                    np.multiply(u, weight, out=t, dtype=ACC_DTYPE)
                    if in_fd >= 0:
                        a = acc[:n]
                        _pread_into(in_fd, a, acc_pos + first * ACC_DTYPE.itemsize)
                        np.add(a, t, out=t)
                    out.write(memoryview(t).cast("B"))
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if in_fd >= 0:
            os.close(in_fd)
    tmp.replace(acc_out)
    fsync_dir(acc_out.parent)


def finalize(
    acc: Path,
    layout: Layout,
    total_weight: float,
    out_path: Path,
    segment_bytes: int,
    chunk_bytes: int,
) -> Manifest:
    """Write ``acc / total_weight`` as the next global model; return its manifest."""
    step = max(1, chunk_bytes // ACC_DTYPE.itemsize)
    buf = np.empty(step, dtype=ACC_DTYPE)
    fd = os.open(acc, os.O_RDONLY)
    try:
        with ModelWriter(out_path, layout, segment_bytes=segment_bytes) as writer:
            for spec, acc_pos in _acc_offsets(layout):
                for first in range(0, spec.numel, step):
                    n = min(step, spec.numel - first)
                    a = buf[:n]
                    _pread_into(fd, a, acc_pos + first * ACC_DTYPE.itemsize)
                    np.divide(a, total_weight, out=a)
                    if spec.np_dtype.kind in "iub":
                        np.rint(a, out=a)
                    writer.write(a.astype(spec.np_dtype))
            return writer.finish()
    finally:
        os.close(fd)
