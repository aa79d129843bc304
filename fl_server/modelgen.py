"""The initial model of a job: generated chunk by chunk, or taken from a user's
checkpoint (blocking).

A checkpoint is a ``.safetensors`` file or a directory of shards with its index, as the
``safetensors`` library and Hugging Face tools write them. It is rewritten as one file
in the server's own layout, and the layout it came in is saved beside the job's models
(``common.checkpoint``), so that results can be written out the way they came in.

A file is taken only from the directories the server's config names in ``model_dirs``
(symbolic links resolved), and so is every shard: a job's submitter must not be able to
have any file the server can read sent to the sites.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from common.checkpoint import (
    INDEX_NAME,
    INDEX_SUFFIX,
    MAX_INDEX_BYTES,
    CheckpointLayout,
    check_file_name,
    copy_range,
    describe,
    internal_metadata,
    parse_index,
    shard_order,
    single_file,
)
from common.config import MIB, FileModel, GeneratedModel, UploadedModel
from common.digest import SegmentHasher, whole_digest
from common.errors import ConfigError, Forbidden, ModelFormatError
from common.modelio import ModelWriter, fsync_dir, read_header
from common.tensorfile import (
    FileHeader,
    Layout,
    Manifest,
    numpy_dtype_named,
    plan_layout,
    st_dtype,
)
from fl_server.staging import Staging
from fl_server.threads import check_stop

# Small on purpose: the server's memory must not depend on how large a tensor is.
GENERATE_CHUNK_BYTES = 1024 * 1024
COPY_CHUNK_BYTES = 4 * 1024 * 1024
# the file name a generated model's checkpoint layout gives it
GENERATED_NAME = "model.safetensors"


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


def _allowed(real: Path, model_dirs: Sequence[Path]) -> bool:
    return any(real.is_relative_to(os.path.realpath(d)) for d in model_dirs)


def model_source(spec: FileModel, model_dirs: Sequence[Path]) -> Path:
    """The real path of the job's model (a file, a shard directory or its index), if it
    lies under one of ``model_dirs``; a relative path is taken from the first.
    ``Forbidden`` naming the field otherwise."""
    given = spec.path if spec.path.is_absolute() or not model_dirs else model_dirs[0] / spec.path
    real = Path(os.path.realpath(given))
    if _allowed(real, model_dirs):
        return real
    raise Forbidden(
        f"model.path: {spec.path} is not under the server's model_dirs "
        f"({', '.join(str(d) for d in model_dirs)}); copy the model there, or add its "
        "directory to model_dirs in the server's config",
        field="model.path",
    )


@dataclass(frozen=True)
class UserCheckpoint:
    """A user's checkpoint, its headers read: the files in internal order, and how the
    internal file that joins them is laid out (``common.checkpoint``)."""

    files: tuple[Path, ...]
    headers: tuple[FileHeader, ...]
    layout: CheckpointLayout

    def plan(self) -> tuple[Layout, bytes]:
        """The internal file's layout and header: every file's tensors in data order."""
        tensors = [(t.name, t.dtype, t.shape) for h in self.headers for t in h.layout.tensors]
        return plan_layout(tensors, internal_metadata(self.layout))


def _index_of(directory: Path) -> Path:
    """The shard index in a checkpoint directory: ``model.safetensors.index.json``, or
    the one ``*.safetensors.index.json`` there is."""
    if (directory / INDEX_NAME).is_file():
        return directory / INDEX_NAME
    found = sorted(p for p in directory.iterdir() if p.name.endswith(INDEX_SUFFIX))
    if len(found) != 1:
        raise ConfigError(
            f"model.path: the directory {directory} must hold one shard index "
            f"(*{INDEX_SUFFIX}, as {INDEX_NAME}); it holds "
            f"{', '.join(p.name for p in found) or 'none'}",
            field="model.path",
        )
    return found[0]


def _shard_path(directory: Path, name: str, model_dirs: Sequence[Path]) -> Path:
    """A shard's real path: a plain name, under ``model_dirs`` once links are resolved."""
    real = Path(os.path.realpath(directory / check_file_name(name)))
    if not _allowed(real, model_dirs):
        raise Forbidden(
            f"model.path: shard {name!r} of {directory} is a link to a file outside the "
            "server's model_dirs",
            field="model.path",
        )
    if not real.is_file():
        raise ConfigError(
            f"model.path: shard {name!r}, named by the index, is not a file in {directory}",
            field="model.path",
        )
    return real


def open_checkpoint(spec: FileModel, model_dirs: Sequence[Path]) -> UserCheckpoint:
    """Find and check the job's model: a ``.safetensors`` file, a directory of shards,
    or the shard index in one (blocking: reads the headers, not the tensors).

    Shards are read in the order of ``common.checkpoint.shard_order``.
    """
    source = model_source(spec, model_dirs)
    if source.is_dir() or (source.name.endswith(INDEX_SUFFIX) and source.is_file()):
        index = _index_of(source) if source.is_dir() else source
        directory = index.parent
        if not _allowed(Path(os.path.realpath(index)), model_dirs):
            raise Forbidden(
                f"model.path: the index {index.name} is a link outside the server's model_dirs",
                field="model.path",
            )
        with open(index, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
        if len(raw) > MAX_INDEX_BYTES:
            raise ModelFormatError(f"shard index {index}: over {MAX_INDEX_BYTES} bytes")
        weight_map, meta = parse_index(raw, index.name)
        names = shard_order(weight_map)
        files = tuple(_shard_path(directory, n, model_dirs) for n in names)
        headers = tuple(_shard_header(f, n) for f, n in zip(files, names, strict=True))
        layout = describe(list(zip(names, headers, strict=True)), meta, weight_map)
        return UserCheckpoint(files, headers, layout)
    if not source.is_file():
        raise ConfigError(
            f"model.path: {spec.path} is not a file on the server, nor a directory of shards",
            field="model.path",
        )
    header = read_header(source)
    return UserCheckpoint((source,), (header,), describe([(source.name, header)]))


def _shard_header(path: Path, name: str) -> FileHeader:
    """A shard's header; an error names the shard, the one file of several at fault."""
    try:
        return read_header(path)
    except ModelFormatError as exc:
        raise ModelFormatError(f"model.path: shard {name!r}: {exc}", field="model.path") from None


def from_file(
    spec: FileModel,
    path: Path,
    segment_bytes: int,
    stop: threading.Event | None = None,
    model_dirs: Sequence[Path] = (),
) -> tuple[Manifest, CheckpointLayout]:
    """Write the user's checkpoint as one file in the server's layout, copying its
    tensors' bytes in chunks and hashing segments on the way (one read of each file).

    The header is the server's own whatever the user's was (spacing, key order,
    padding), with the ``__metadata__`` kept (``internal_metadata``); the tensors follow
    in the internal order. A file already in that layout is copied byte for byte.
    """
    ckpt = open_checkpoint(spec, model_dirs)
    layout, head = ckpt.plan()
    tmp = path.with_name(path.name + ".part")
    hasher = SegmentHasher(segment_bytes)
    buf = bytearray(COPY_CHUNK_BYTES)
    try:
        with open(tmp, "wb", buffering=0) as dst:
            hasher.feed(head)
            dst.write(head)
            for file, header in zip(ckpt.files, ckpt.headers, strict=True):
                check_stop(stop)
                _copy_data(spec, file, header, dst, buf, hasher, stop)
            os.fsync(dst.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    digests = tuple(hasher.finish())
    manifest = Manifest(
        layout=layout,
        segment_bytes=segment_bytes,
        segment_digests=digests,
        digest=whole_digest(digests),
    )
    return manifest, ckpt.layout


def _copy_data(
    spec: FileModel,
    file: Path,
    header: FileHeader,
    dst: BinaryIO,
    buf: bytearray,
    hasher: SegmentHasher,
    stop: threading.Event | None,
) -> None:
    """Append the tensor bytes of one file (all of them, in data order) to ``dst``."""
    start, size = header.layout.data_offset, header.layout.data_bytes
    with open(file, "rb", buffering=0) as src:
        if os.fstat(src.fileno()).st_size != start + size:
            raise ModelFormatError(
                f"model.path: {spec.path}: {file.name} changed while it was copied",
                field="model.path",
            )
        for first in range(0, size, len(buf)):
            check_stop(stop)  # the caller removes the partial file
            n = min(len(buf), size - first)
            copy_range(src.fileno(), dst, start + first, n, buf, hasher.feed)


def save_checkpoint(path: Path, layout: CheckpointLayout) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(layout.model_dump_json())
    tmp.replace(path)


def prepare_initial(
    spec: GeneratedModel | FileModel | UploadedModel,
    path: Path,
    segment_bytes: int,
    stop: threading.Event | None = None,
    model_dirs: Sequence[Path] = (),
    checkpoint: Path | None = None,
    uploads: Staging | None = None,
) -> Manifest:
    """Write the job's initial model at ``path``; ``stop`` (checked once per chunk) ends
    it early with ``Stopped``, leaving no partial file. A file model must lie under one
    of ``model_dirs``; an uploaded one is read from its staged folder in ``uploads``
    (and from nowhere else), like a file model. The layout the model came in is saved
    at ``checkpoint``: a generated model's is a single file, ``model.safetensors``,
    without metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, GeneratedModel):
        manifest = generate(spec, path, segment_bytes, stop)
        layout = single_file(GENERATED_NAME, [t.name for t in manifest.layout.tensors])
    else:
        if isinstance(spec, UploadedModel):
            if uploads is None:
                raise Forbidden("this server takes no uploaded models", field="model.upload_id")
            upload_id = spec.upload_id
            spec = FileModel(path=uploads.staged_source(upload_id))
            model_dirs = (uploads.model_dir(upload_id),)
        manifest, layout = from_file(spec, path, segment_bytes, stop, model_dirs)
    if checkpoint is not None:
        save_checkpoint(checkpoint, layout)
    return manifest
