"""Weighted averaging on disk, one bounded chunk at a time (blocking: run in a thread).

Theory of operation. A round's running aggregate is a list of *sources* whose weighted
sum is sum(w_i * x_i): an update file (model dtype, scaled by its weight on the fly) or
a float64 accumulator file (already weighted). Every step reads its sources chunk by
chunk, sums them in float64 in a fixed order, and writes one output:

- ``fold``: the sum, as a new float64 accumulator (``acc-{n}``), so spool files of
  updates already counted can be deleted while other clients are still uploading;
- ``finalize``: the sum divided by the total weight, cast to the model's dtype, as the
  next global model.

The first update of a round is not copied anywhere: its spool file already is the
aggregate. With two clients a round then writes the next global model once and nothing
else, instead of a float64 accumulator per update; disk traffic is the limit of this
whole system, so that matters. Outputs are written beside their final name and renamed,
so a crash mid-step leaves the previous state intact and the step is redone.

With integer weights, ``w * x`` of a float32 value is exact in float64, so the result
equals numpy's ``average(..., weights=...)`` computed in float64 and cast back.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.modelio import ModelReader, ModelWriter, byte_view
from common.tensorfile import Layout, Manifest, TensorSpec
from fl_server.threads import check_stop

ACC_DTYPE = np.dtype("<f8")


@dataclass(frozen=True)
class Source:
    """An update file scaled by ``weight``, or (``weight`` None) a float64 accumulator."""

    path: Path
    weight: float | None


def _acc_layout(layout: Layout) -> Layout:
    """Where each tensor's float64 sum lies in an accumulator file: the model's tensors
    in order, ``ACC_DTYPE`` elements, no header."""
    specs, pos = [], 0
    for spec in layout.tensors:
        nbytes = spec.numel * ACC_DTYPE.itemsize
        specs.append(
            TensorSpec(name=spec.name, dtype="F64", shape=spec.shape, begin=pos, end=pos + nbytes)
        )
        pos += nbytes
    return Layout(tensors=tuple(specs), data_offset=0)


def _sums(
    sources: Sequence[Source],
    layout: Layout,
    chunk_bytes: int,
    stop: threading.Event | None,
    only: Sequence[int] | None = None,
) -> Iterator[tuple[TensorSpec, int, npt.NDArray[np.float64]]]:
    """Yield (tensor, first element, float64 chunk of the weighted sum), in file order.

    ``only``: the indices of the tensors to go through (default: all of them). The
    yielded buffer is reused: the consumer must be done with it before the next one.
    Raises ``Stopped`` before the next chunk once ``stop`` is set.
    """
    step = max(1, chunk_bytes // ACC_DTYPE.itemsize)
    total = np.empty(step, dtype=ACC_DTYPE)
    term = np.empty(step, dtype=ACC_DTYPE)
    raw = np.empty(step * ACC_DTYPE.itemsize, dtype=np.uint8)
    acc = _acc_layout(layout)
    with contextlib.ExitStack() as stack:
        readers = [
            stack.enter_context(ModelReader(s.path, acc if s.weight is None else layout))
            for s in sources
        ]
        chosen = range(len(layout.tensors)) if only is None else sorted(only)
        for t in chosen:
            spec, acc_spec = layout.tensors[t], acc.tensors[t]
            isz = spec.np_dtype.itemsize
            for first in range(0, spec.numel, step):
                check_stop(stop)
                n = min(step, spec.numel - first)
                for k, (src, reader) in enumerate(zip(sources, readers, strict=True)):
                    dst = total[:n] if k == 0 else term[:n]
                    if src.weight is None:
                        reader.read_into(acc_spec, first, dst)
                    else:
                        u = raw[: n * isz].view(spec.np_dtype)
                        reader.read_into(spec, first, u)
                        np.multiply(u, src.weight, out=dst, dtype=ACC_DTYPE)
                    if k:
                        np.add(total[:n], dst, out=total[:n])
                yield spec, first, total[:n]


def fold(
    sources: Sequence[Source],
    layout: Layout,
    out: Path,
    chunk_bytes: int,
    stop: threading.Event | None = None,
) -> None:
    """Write the weighted sum of ``sources`` as a float64 accumulator at ``out``.

    ``stop`` ends it early, between chunks, with ``Stopped`` and no partial file.
    """
    tmp = out.with_name(out.name + ".part")
    try:
        with open(tmp, "wb") as f:
            for _, _, chunk in _sums(sources, layout, chunk_bytes, stop):
                f.write(chunk.data.cast("B"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)


def finalize(
    sources: Sequence[Source],
    layout: Layout,
    total_weight: float,
    out: Path,
    segment_bytes: int,
    chunk_bytes: int,
    stop: threading.Event | None = None,
) -> Manifest:
    """Write sum(sources) / total_weight in the model's dtypes as the next global model.

    ``stop`` ends it early, between chunks, with ``Stopped`` and no partial file.
    """
    with ModelWriter(out, layout, segment_bytes=segment_bytes) as writer:
        for spec, _, chunk in _sums(sources, layout, chunk_bytes, stop):
            writer.write(_average(chunk, total_weight, spec))
        return writer.finish()  # durable: the file and its directory entry are synced


def _average(
    chunk: npt.NDArray[np.float64], total_weight: float, spec: TensorSpec
) -> npt.NDArray[np.generic]:
    """A chunk of the weighted sum as the average, in the tensor's dtype (``chunk`` is
    overwritten)."""
    np.divide(chunk, total_weight, out=chunk)
    if spec.np_dtype.kind in "iub":
        np.rint(chunk, out=chunk)
    return chunk.astype(spec.np_dtype)


def write_average(
    sources: Sequence[Source],
    layout: Layout,
    total_weight: float,
    tensors: Sequence[int],
    fd: int,
    data_offset: int,
    chunk_bytes: int,
    stop: threading.Event | None = None,
) -> None:
    """Write the average of ``sources`` for the ``tensors`` given (indices into the
    layout) at their places in the model file open at ``fd``, whose tensor data starts
    at ``data_offset``; the rest of the file is left alone.

    The same values ``finalize`` writes: the same sums, in the same order of sources.
    """
    for spec, first, chunk in _sums(sources, layout, chunk_bytes, stop, only=tensors):
        out = _average(chunk, total_weight, spec)
        pos = data_offset + spec.begin + first * spec.np_dtype.itemsize
        view = byte_view(out)
        while view.nbytes:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
