"""The initial model of a job: generated chunk by chunk, or taken from a file (blocking).

A file is taken only from the directories the server's config names in ``model_dirs``
(symbolic links resolved): a job's submitter must not be able to have any file the
server can read sent to the sites.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.config import MIB, FileModel, GeneratedModel, UploadedModel
from common.digest import SegmentHasher, whole_digest
from common.errors import Forbidden, ModelFormatError
from common.modelio import ModelWriter, fsync_dir, read_layout
from common.tensorfile import Manifest, numpy_dtype_named, st_dtype
from fl_server.staging import Staging
from fl_server.threads import check_stop

# Small on purpose: the server's memory must not depend on how large a tensor is.
GENERATE_CHUNK_BYTES = 1024 * 1024
COPY_CHUNK_BYTES = 4 * 1024 * 1024


def tensor_shape(spec: GeneratedModel) -> tuple[int, ...]:
    if spec.tensor_shape is not None:
        return tuple(spec.tensor_shape)
    assert spec.tensor_mib is not None
    itemsize = numpy_dtype_named(spec.dtype).itemsize
    return (max(1, int(spec.tensor_mib * MIB) // itemsize),)


def generate(
    spec: GeneratedModel, path: Path, segment_bytes: int, stop: threading.Event | None = None
) -> Manifest:
    dtype: np.dtype[Any] = numpy_dtype_named(spec.dtype)
    shape = tensor_shape(spec)
    numel = math.prod(shape)
    tensors = [(f"layer{i:05d}", st_dtype(dtype), shape) for i in range(spec.num_tensors)]
    step = max(1, GENERATE_CHUNK_BYTES // dtype.itemsize)
    # numpy draws normals in float32 or float64 only; float16 and bfloat16 are drawn in
    # float32 and rounded to nearest even
    draw = dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)
    with ModelWriter(path, tensors, segment_bytes=segment_bytes) as writer:
        for i in range(spec.num_tensors):
            rng = np.random.default_rng([spec.seed, i])
            for first in range(0, numel, step):
                check_stop(stop)  # the writer removes its partial file
                n = min(step, numel - first)
                if spec.init == "normal":
                    chunk = rng.standard_normal(n, dtype=draw).astype(dtype, copy=False)
                elif spec.init == "zeros":
                    chunk = np.zeros(n, dtype=dtype)
                else:
                    chunk = np.arange(first, first + n, dtype=np.float64).astype(dtype)
                writer.write(chunk)
        return writer.finish()


def model_source(spec: FileModel, model_dirs: Sequence[Path]) -> Path:
    """The real path of the job's model file, if it lies under one of ``model_dirs``; a
    relative path is taken from the first. ``Forbidden`` naming the field otherwise."""
    given = spec.path if spec.path.is_absolute() or not model_dirs else model_dirs[0] / spec.path
    real = Path(os.path.realpath(given))
    if any(real.is_relative_to(os.path.realpath(d)) for d in model_dirs):
        return real
    raise Forbidden(
        f"model.path: {spec.path} is not under the server's model_dirs "
        f"({', '.join(str(d) for d in model_dirs)}); copy the model there, or add its "
        "directory to model_dirs in the server's config",
        field="model.path",
    )


def from_file(
    spec: FileModel,
    path: Path,
    segment_bytes: int,
    stop: threading.Event | None = None,
    model_dirs: Sequence[Path] = (),
) -> Manifest:
    """Copy the user's file in chunks, hashing its segments on the way (one read)."""
    source = model_source(spec, model_dirs)
    layout = read_layout(source)  # fail early, with the format error, before copying
    tmp = path.with_name(path.name + ".part")
    hasher = SegmentHasher(segment_bytes)
    buf = bytearray(COPY_CHUNK_BYTES)
    try:
        with open(source, "rb", buffering=0) as src, open(tmp, "wb", buffering=0) as dst:
            while got := src.readinto(buf):
                check_stop(stop)
                view = memoryview(buf)[:got]
                hasher.feed(view)
                while view:
                    view = view[dst.write(view) or 0 :]
            if dst.tell() != layout.file_size:
                raise ModelFormatError(
                    f"model.path: {spec.path} changed while it was copied "
                    f"({dst.tell()} bytes, its header says {layout.file_size})"
                )
            os.fsync(dst.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    digests = tuple(hasher.finish())
    return Manifest(
        layout=layout,
        segment_bytes=segment_bytes,
        segment_digests=digests,
        digest=whole_digest(digests),
    )


def prepare_initial(
    spec: GeneratedModel | FileModel | UploadedModel,
    path: Path,
    segment_bytes: int,
    stop: threading.Event | None = None,
    model_dirs: Sequence[Path] = (),
    uploads: Staging | None = None,
) -> Manifest:
    """Write the job's initial model at ``path``; ``stop`` (checked once per chunk) ends
    it early with ``Stopped``, leaving no partial file. A file model must lie under one
    of ``model_dirs``; an uploaded one is read from its staged folder in ``uploads``
    (and from nowhere else), like a file model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, GeneratedModel):
        return generate(spec, path, segment_bytes, stop)
    if isinstance(spec, UploadedModel):
        if uploads is None:
            raise Forbidden("this server takes no uploaded models", field="model.upload_id")
        source = uploads.staged_source(spec.upload_id)
        staged = (uploads.model_dir(spec.upload_id),)
        return from_file(FileModel(path=source), path, segment_bytes, stop, staged)
    return from_file(spec, path, segment_bytes, stop, model_dirs)
