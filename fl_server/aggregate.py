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

Rules per kind of tensor (``TensorSpec.averaged``):

- float tensors (F64, F32, F16, BF16) are averaged: the float64 average is rounded to
  nearest, ties to even, into the tensor's own type, once (numpy's cast for F32/F16,
  ml_dtypes' for BF16, which rounds from float64 directly, not through float32). With
  integer weights, ``w * x`` of such a value is exact in float64, so the result equals
  numpy's ``average(..., weights=...)`` computed in float64 and cast back;
- integer and bool tensors are not averaged: every update carries them unchanged (the
  server refuses one that does not, ``fl_server.verify``), and the next global model
  takes their bytes from the round's base model, copied. float64 would round int64
  values past 2**53, and an average of masks or counters means nothing. Accumulators
  hold no such tensors.
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
    """Where each averaged tensor's float64 sum lies in an accumulator file: the model's
    float tensors in order, ``ACC_DTYPE`` elements, no header."""
    specs, pos = [], 0
    for spec in layout.tensors:
        if not spec.averaged:
            continue
        nbytes = spec.numel * ACC_DTYPE.itemsize
        specs.append(
            TensorSpec(name=spec.name, dtype="F64", shape=spec.shape, begin=pos, end=pos + nbytes)
        )
        pos += nbytes
    return Layout(tensors=tuple(specs), data_offset=0)


class _Sums:
    """The sources open for reading, and the buffers of one chunk of their sum."""

    def __init__(self, sources: Sequence[Source], layout: Layout, chunk_bytes: int) -> None:
        self.step = max(1, chunk_bytes // ACC_DTYPE.itemsize)
        self._total = np.empty(self.step, dtype=ACC_DTYPE)
        self._term = np.empty(self.step, dtype=ACC_DTYPE)
        self.raw = np.empty(self.step * ACC_DTYPE.itemsize, dtype=np.uint8)
        self._sources = sources
        acc = _acc_layout(layout)
        self._acc = {spec.name: spec for spec in acc.tensors}
        with contextlib.ExitStack() as stack:  # closes the readers opened if one fails
            self._readers = [
                stack.enter_context(ModelReader(s.path, acc if s.weight is None else layout))
                for s in sources
            ]
            self._stack = stack.pop_all()

    def __enter__(self) -> _Sums:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def chunks(
        self, spec: TensorSpec, stop: threading.Event | None
    ) -> Iterator[tuple[int, npt.NDArray[np.float64]]]:
        """Yield (first element, float64 chunk of the weighted sum) of one float tensor.

        The yielded buffer is reused: the consumer must be done with it before the next
        one. Raises ``Stopped`` before the next chunk once ``stop`` is set.
        """
        acc_spec, isz, total = self._acc[spec.name], spec.np_dtype.itemsize, self._total
        for first in range(0, spec.numel, self.step):
            check_stop(stop)
            n = min(self.step, spec.numel - first)
            for k, (src, reader) in enumerate(zip(self._sources, self._readers, strict=True)):
                dst = total[:n] if k == 0 else self._term[:n]
                if src.weight is None:
                    reader.read_into(acc_spec, first, dst)
                else:
                    u = self.raw[: n * isz].view(spec.np_dtype)
                    reader.read_into(spec, first, u)
                    np.multiply(u, src.weight, out=dst, dtype=ACC_DTYPE)
                if k:
                    np.add(total[:n], dst, out=total[:n])
            yield first, total[:n]


def _outputs(
    sources: Sequence[Source],
    base: Path,
    layout: Layout,
    total_weight: float,
    chunk_bytes: int,
    stop: threading.Event | None,
    only: Sequence[int] | None = None,
) -> Iterator[tuple[TensorSpec, int, npt.NDArray[np.generic]]]:
    """Yield (tensor, first element, chunk of the next global model), in file order.

    Float tensors are the average of ``sources``; integer and bool tensors are the
    bytes of ``base`` (the round's global model, laid out as ``layout``). ``only``: the
    indices of the tensors to go through (default: all of them). A carried chunk is a
    view of a reused buffer: the consumer must be done with it before the next one.
    """
    with _Sums(sources, layout, chunk_bytes) as sums, ModelReader(base, layout) as kept:
        for t in range(len(layout.tensors)) if only is None else sorted(only):
            spec = layout.tensors[t]
            if spec.averaged:
                for first, chunk in sums.chunks(spec, stop):
                    yield spec, first, _average(chunk, total_weight, spec)
                continue
            step = len(sums.raw) // spec.np_dtype.itemsize
            for first in range(0, spec.numel, step):
                check_stop(stop)
                n = min(step, spec.numel - first)
                out = sums.raw[: n * spec.np_dtype.itemsize].view(spec.np_dtype)
                kept.read_into(spec, first, out)
                yield spec, first, out


def fold(
    sources: Sequence[Source],
    layout: Layout,
    out: Path,
    chunk_bytes: int,
    stop: threading.Event | None = None,
) -> None:
    """Write the weighted sum of ``sources`` as a float64 accumulator at ``out`` (its
    float tensors only: the others are not averaged).

    ``stop`` ends it early, between chunks, with ``Stopped`` and no partial file.
    """
    tmp = out.with_name(out.name + ".part")
    try:
        with open(tmp, "wb") as f, _Sums(sources, layout, chunk_bytes) as sums:
            for spec in layout.tensors:
                if spec.averaged:
                    for _, chunk in sums.chunks(spec, stop):
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
    *,
    base: Path,
) -> Manifest:
    """Write sum(sources) / total_weight in the model's dtypes as the next global model,
    its integer and bool tensors copied from ``base``, the round's global model.

    ``stop`` ends it early, between chunks, with ``Stopped`` and no partial file.
    """
    with ModelWriter(out, layout, segment_bytes=segment_bytes) as writer:
        for _, _, chunk in _outputs(sources, base, layout, total_weight, chunk_bytes, stop):
            writer.write(chunk)
        return writer.finish()  # durable: the file and its directory entry are synced


def _average(
    chunk: npt.NDArray[np.float64], total_weight: float, spec: TensorSpec
) -> npt.NDArray[np.generic]:
    """A chunk of the weighted sum as the average, rounded to nearest even in the
    tensor's float dtype (``chunk`` is overwritten)."""
    np.divide(chunk, total_weight, out=chunk)
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
    *,
    base: Path,
) -> None:
    """Write the next global model's ``tensors`` (indices into the layout) at their
    places in the model file open at ``fd``, whose tensor data starts at
    ``data_offset``; the rest of the file is left alone.

    The same values ``finalize`` writes: the same sums, in the same order of sources,
    and the same bytes of ``base`` for integer and bool tensors.
    """
    for spec, first, out in _outputs(
        sources, base, layout, total_weight, chunk_bytes, stop, only=tensors
    ):
        pos = data_offset + spec.begin + first * spec.np_dtype.itemsize
        view = byte_view(out)
        while view.nbytes:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
