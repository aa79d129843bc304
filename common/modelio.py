"""Reading and writing model files in bounded chunks (blocking: call from a thread).

Nothing here holds more than one chunk of a tensor in memory. ``ModelWriter`` writes a
file sequentially, tensor by tensor, hashing segments as the bytes go by, so the
manifest is ready when the last byte is written. ``ModelReader`` hands out chunks of a
tensor, either as fresh arrays or read into a caller's preallocated buffer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import xxhash

from common.digest import (
    SegmentHasher,
    segment_count,
    segment_digest,
    segment_range,
    whole_digest,
)
from common.errors import ModelFormatError
from common.recycle import FilePool
from common.storage import allocate
from common.tensorfile import (
    HEADER_LEN_BYTES,
    FileHeader,
    Layout,
    Manifest,
    TensorSpec,
    element_window,
    header_length,
    parse_file_header,
    plan_layout,
)

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024


def byte_view(a: npt.NDArray[Any]) -> memoryview:
    """The bytes of a C-contiguous array as a flat ``B`` memoryview, without a copy.

    numpy's stubs do not declare the buffer protocol, so ``memoryview(a)`` fails mypy;
    ``ndarray.data`` is typed. Going through a ``uint8`` view instead of
    ``memoryview.cast("B")`` also covers zero-size arrays, which ``cast`` refuses. The
    view is writable when the array is, so it can be a ``preadv`` target.
    """
    if not a.flags.c_contiguous:
        raise ValueError("byte_view needs a C-contiguous array (use np.ascontiguousarray)")
    return a.reshape(-1).view(np.uint8).data


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelWriter:
    """Writes ``path`` via a temporary file; ``finish()`` renames it into place.

    Zero-size tensors take no ``write``: the writer steps over them on its own, so the
    caller only ever feeds tensors that hold bytes. Leaving a ``with`` block without
    ``finish()``, with or without an exception, aborts: a ``.part`` never outlives the
    block. ``durable=False`` skips both fsyncs in ``finish()``, for scratch files that
    can be regenerated after a crash; the file and manifest are the same either way.

    ``over`` names an existing file with the same header (``same_head``) to write over
    instead of a new one: it is renamed to the ``.part`` first, so it is gone whatever
    happens next. Its pages are in the page cache when it was just written, and
    overwriting them costs a fraction of filling fresh ones, which on a busy host is most
    of a model-size write; it also halves the disk the pair of files would take. A reader
    opened on ``over`` before keeps reading it, as long as it never reads bytes this
    writer has already written. Otherwise, with a ``pool``, the file is a spare from it
    when one is there, overwritten from the first byte to the last (``common.recycle``).
    """

    def __init__(
        self,
        path: Path,
        tensors: Sequence[tuple[str, str, Sequence[int]]] | Layout,
        *,
        segment_bytes: int,
        metadata: dict[str, str] | None = None,
        durable: bool = True,
        over: Path | None = None,
        pool: FilePool | None = None,
    ) -> None:
        if isinstance(tensors, Layout):
            tensors = [(t.name, t.dtype, t.shape) for t in tensors.tensors]
        self.layout, head = plan_layout(tensors, metadata)
        self.path = path
        self._tmp = path.with_name(path.name + ".part")
        self._segment_bytes = segment_bytes
        self._durable = durable
        self._hasher = SegmentHasher(segment_bytes)
        if over is not None:
            os.replace(over, self._tmp)
            reused = True
        else:
            reused = pool is not None and pool.take(self._tmp, self.layout.file_size)
        # "r+b" keeps the bytes of a file written over (its pages are the point of it);
        # both modes write from offset 0. Closed in finish() or abort().
        self._file: BinaryIO = open(self._tmp, "r+b" if reused else "wb")  # noqa: SIM115
        self._index = 0
        self._filled = 0
        try:
            allocate(self._file.fileno(), self.layout.file_size)
            self._emit(head)
        except BaseException:
            self.abort()
            raise
        self._advance()

    def _emit(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hasher.feed(data)

    def _advance(self) -> None:
        """Move past the tensor just completed and past any zero-size ones after it.

        Called after every write and once at construction, so that ``current`` is never
        a tensor that is already full (a zero-size one is full from the start).
        """
        while (cur := self.current) is not None and self._filled == cur.nbytes:
            self._index += 1
            self._filled = 0

    @property
    def current(self) -> TensorSpec | None:
        tensors = self.layout.tensors
        return tensors[self._index] if self._index < len(tensors) else None

    def write(self, chunk: npt.NDArray[np.generic], *, name: str | None = None) -> None:
        """Append ``chunk`` (any shape, C order) to the tensor being written."""
        spec = self.current
        if spec is None:
            raise ModelFormatError("all tensors are already written")
        if name is not None and name != spec.name:
            raise ModelFormatError(f"expected data for tensor {spec.name!r}, got {name!r}")
        if chunk.dtype != spec.np_dtype:
            raise ModelFormatError(
                f"tensor {spec.name!r}: chunk has dtype {chunk.dtype}, expected {spec.np_dtype}"
            )
        data = byte_view(np.ascontiguousarray(chunk))
        if self._filled + data.nbytes > spec.nbytes:
            raise ModelFormatError(
                f"tensor {spec.name!r}: {self._filled + data.nbytes} bytes written, "
                f"it holds {spec.nbytes}"
            )
        self._emit(data)
        self._filled += data.nbytes
        self._advance()

    def finish(self) -> Manifest:
        if self.current is not None:
            raise ModelFormatError(
                f"tensor {self.current.name!r} is incomplete: {self._filled} of "
                f"{self.current.nbytes} bytes written"
            )
        try:
            self._file.truncate()  # a file written over may have been longer
            self._file.flush()
            if self._durable:
                os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        if self._durable:
            fsync_dir(self.path.parent)
        digests = tuple(self._hasher.finish())
        return Manifest(
            layout=self.layout,
            segment_bytes=self._segment_bytes,
            segment_digests=digests,
            digest=whole_digest(digests),
        )

    def abort(self) -> None:
        # closing flushes, which fails again on the full disk that brought us here: the
        # partial file goes in any case
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Still open means finish() was never reached (or failed before the rename).
        if not self._file.closed:
            self.abort()


def same_head(path: Path, layout: Layout, metadata: dict[str, str] | None = None) -> bool:
    """Whether ``path`` starts with the header ``ModelWriter`` would write for ``layout``.

    Only then can the writer write over it (``over=``): every tensor is then at the same
    offset in both, so a chunk replaces the bytes it was computed from.
    """
    _, head = plan_layout([(t.name, t.dtype, t.shape) for t in layout.tensors], metadata)
    with open(path, "rb") as f:
        return f.read(len(head)) == head


def read_header(path: Path) -> FileHeader:
    """The header of the file at ``path``, checked against the file's size."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(HEADER_LEN_BYTES)
        n = header_length(prefix)
        head = prefix + f.read(n)
    return parse_file_header(head, file_size=size)


def read_layout(path: Path) -> Layout:
    return read_header(path).layout


class ModelReader:
    """Chunked, read-only access to a model file; never loads a whole tensor by itself.

    ``metadata`` is the file's ``__metadata__`` when the reader read the header itself
    (no ``layout`` given): a writer of an update that must match the model's header
    needs it (``ModelWriter(..., metadata=reader.metadata)``).
    """

    def __init__(self, path: Path, layout: Layout | None = None) -> None:
        self.path = path
        self.metadata: dict[str, str] | None = None
        if layout is None:
            header = read_header(path)
            layout, self.metadata = header.layout, header.metadata
        self.layout = layout
        self._fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.layout.tensors]

    def read_into(self, spec: TensorSpec, first: int, out: npt.NDArray[np.generic]) -> None:
        """Fill ``out`` (1-D, the tensor's dtype) with elements ``first..first+len(out)``."""
        view = byte_view(out)
        pos = self.layout.data_offset + spec.begin + first * spec.np_dtype.itemsize
        while view.nbytes:
            n = os.preadv(self._fd, [view], pos)
            if n == 0:
                raise ModelFormatError(f"{self.path}: file ends inside tensor {spec.name!r}")
            view = view[n:]
            pos += n

    def iter_chunks(
        self, name: str, max_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[npt.NDArray[np.generic]]:
        """Yield the flat tensor in chunks; each chunk is a fresh array the caller may keep."""
        spec = self.layout.tensor(name)
        step = element_window(spec, max_bytes)
        for first in range(0, spec.numel, step):
            out = np.empty(min(step, spec.numel - first), dtype=spec.np_dtype)
            self.read_into(spec, first, out)
            yield out

    def read_tensor(self, name: str) -> npt.NDArray[np.generic]:
        """Load one whole tensor: for trainer plugins that want it; the framework never does."""
        spec = self.layout.tensor(name)
        out = np.empty(spec.numel, dtype=spec.np_dtype)
        self.read_into(spec, 0, out)
        return out.reshape(spec.shape)


def hash_file_segments(
    path: Path, segment_bytes: int, indices: Sequence[int] | None = None
) -> dict[int, str]:
    """Digest of each listed segment of a file (all by default), reading it in chunks.

    An index outside the file is an error rather than the digest of an empty range,
    which would look like a real answer to a caller comparing digests.
    """
    size = path.stat().st_size
    count = segment_count(size, segment_bytes)
    chosen = range(count) if indices is None else indices
    for i in chosen:
        if not 0 <= i < count:
            raise ValueError(
                f"segment index {i} is out of range: {path} has {count} segment(s) "
                f"of {segment_bytes} bytes, indices 0..{count - 1}"
            )
    out: dict[int, str] = {}
    buf = bytearray(min(segment_bytes, DEFAULT_CHUNK_BYTES))
    with open(path, "rb", buffering=0) as f:
        for i in chosen:
            start, end = segment_range(i, size, segment_bytes)
            if end - start <= len(buf):
                f.seek(start)
                view = memoryview(buf)[: end - start]
                got = f.readinto(view)
                out[i] = segment_digest(view[: got or 0])
                continue
            h = xxhash.xxh3_64()
            f.seek(start)
            left = end - start
            while left:
                view = memoryview(buf)[: min(left, len(buf))]
                got = f.readinto(view)
                if not got:
                    break
                h.update(view[:got])
                left -= got
            out[i] = h.hexdigest()
    return out


def compute_manifest(path: Path, segment_bytes: int) -> Manifest:
    """Manifest of an existing file (e.g. a user-supplied initial model)."""
    layout = read_layout(path)
    digests = hash_file_segments(path, segment_bytes)
    ordered = tuple(digests[i] for i in range(len(digests)))
    return Manifest(
        layout=layout,
        segment_bytes=segment_bytes,
        segment_digests=ordered,
        digest=whole_digest(ordered),
    )
