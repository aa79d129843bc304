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

import numpy as np
import numpy.typing as npt

from common.digest import SegmentHasher, segment_count, segment_range, whole_digest
from common.errors import ModelFormatError
from common.tensorfile import (
    HEADER_LEN_BYTES,
    Layout,
    Manifest,
    TensorSpec,
    element_window,
    header_length,
    parse_header,
    plan_layout,
)

DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelWriter:
    """Writes ``path`` via a temporary file; ``finish()`` renames it into place."""

    def __init__(
        self,
        path: Path,
        tensors: Sequence[tuple[str, str, Sequence[int]]] | Layout,
        *,
        segment_bytes: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if isinstance(tensors, Layout):
            tensors = [(t.name, t.dtype, t.shape) for t in tensors.tensors]
        self.layout, head = plan_layout(tensors, metadata)
        self.path = path
        self._tmp = path.with_name(path.name + ".part")
        self._segment_bytes = segment_bytes
        self._hasher = SegmentHasher(segment_bytes)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self._index = 0
        self._filled = 0
        self._emit(head)

    def _emit(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hasher.feed(data)

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
        data = memoryview(np.ascontiguousarray(chunk)).cast("B")
        if self._filled + data.nbytes > spec.nbytes:
            raise ModelFormatError(
                f"tensor {spec.name!r}: {self._filled + data.nbytes} bytes written, "
                f"it holds {spec.nbytes}"
            )
        self._emit(data)
        self._filled += data.nbytes
        while (cur := self.current) is not None and self._filled == cur.nbytes:
            self._index += 1
            self._filled = 0

    def finish(self) -> Manifest:
        if self.current is not None:
            raise ModelFormatError(
                f"tensor {self.current.name!r} is incomplete: {self._filled} of "
                f"{self.current.nbytes} bytes written"
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        digests = tuple(self._hasher.finish())
        return Manifest(
            layout=self.layout,
            segment_bytes=self._segment_bytes,
            segment_digests=digests,
            digest=whole_digest(digests),
        )

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not self._file.closed:
            self.abort()


def read_layout(path: Path) -> Layout:
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(HEADER_LEN_BYTES)
        n = header_length(prefix)
        head = prefix + f.read(n)
    return parse_header(head, file_size=size)


class ModelReader:
    """Chunked, read-only access to a model file; never loads a whole tensor by itself."""

    def __init__(self, path: Path, layout: Layout | None = None) -> None:
        self.path = path
        self.layout = layout if layout is not None else read_layout(path)
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
        view = memoryview(out).cast("B")
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
    """Digest of each listed segment of a file (all by default), reading it in chunks."""
    from common.digest import segment_digest

    size = path.stat().st_size
    count = segment_count(size, segment_bytes)
    chosen = range(count) if indices is None else indices
    out: dict[int, str] = {}
    import xxhash

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
