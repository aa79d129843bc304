"""Checkpoints as their owners wrote them: one safetensors file, or a directory of shards.

Theory of operation. Inside a job a model is always one file in the server's own header
layout (``common.tensorfile.plan_layout``): transfers, update checks and aggregation
compare layouts, and one layout for every model keeps them simple. What the user's
checkpoint looked like is kept beside it as a ``CheckpointLayout``: one file or shards;
per shard its file name, its tensors in data order and its ``__metadata__``; for shards,
the index file's name and its ``metadata``. ``write_checkpoint`` turns an internal file
back into that shape, copying bytes chunk by chunk, so that the user's loaders
(``safetensors``, or any that reads ``model.safetensors.index.json``) open the result
as they opened the input.

Order. The internal file holds the tensors of one shard after another, the shards in
the order of their file names sorted as strings (the Hugging Face names
``model-00001-of-00003.safetensors`` sort in their numbering order), and within a shard
in data order (by ``data_offsets``). It does not depend on the order in which the index
lists its ``weight_map``, so the same checkpoint always gives the same internal file.

A ``CheckpointLayout`` may come over the network (``GET /v1/admin/jobs/{id}/checkpoint``),
so every name in it is checked to be a plain file name, when it is built and again
before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from common.errors import ModelFormatError
from common.modelio import fsync_dir, read_header
from common.tensorfile import FileHeader, TensorSpec, plan_layout

INDEX_NAME = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"
# what transformers' save_pretrained writes in the index's metadata: the tensors' bytes
TOTAL_SIZE = "total_size"
MAX_INDEX_BYTES = 100 * 1024 * 1024


def check_file_name(name: str, what: str = "shard file") -> str:
    """``name`` if it is a plain file name; a ``ModelFormatError`` naming it otherwise.

    A name with a separator, ``.``/``..`` or an absolute path would put a file
    outside the checkpoint's directory, on the server when it reads one and on the
    admin's machine when it writes one.
    """
    if (
        not name
        or name in {".", ".."}
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
    ):
        raise ModelFormatError(
            f"{what} {name!r} is not a plain file name: a checkpoint's files lie side by "
            "side in one directory (no '/', no '..', no absolute path)"
        )
    return name


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShardLayout(_Frozen):
    file: str = Field(description="The file's name, without a directory.")
    tensors: tuple[str, ...] = Field(description="Its tensors, in data order.")
    metadata: dict[str, str] | None = Field(None, description="Its header's __metadata__.")

    @model_validator(mode="after")
    def _plain_name(self) -> ShardLayout:
        check_file_name(self.file)
        return self


class IndexLayout(_Frozen):
    file: str = Field(INDEX_NAME, description="The index file's name, without a directory.")
    metadata: dict[str, JsonValue] | None = Field(
        None, description="The index's 'metadata' object; None when it had none."
    )

    @model_validator(mode="after")
    def _plain_name(self) -> IndexLayout:
        check_file_name(self.file, "index file")
        return self


class CheckpointLayout(_Frozen):
    """How a job's model was laid out when its owner gave it: see the module's docstring."""

    version: Literal[1] = 1
    shards: tuple[ShardLayout, ...] = Field(
        min_length=1, description="One for a single file; the shards in internal order."
    )
    index: IndexLayout | None = Field(None, description="The shard index; None for one file.")

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointLayout:
        if self.index is None and len(self.shards) != 1:
            raise ModelFormatError("a checkpoint of several shards needs an index")
        files = [s.file for s in self.shards] + ([self.index.file] if self.index else [])
        if len(set(files)) != len(files):
            raise ModelFormatError(f"a checkpoint names a file twice: {files}")
        names = self.tensors
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ModelFormatError(f"tensor(s) {twice[:5]} are in more than one shard")
        return self

    @property
    def is_sharded(self) -> bool:
        return self.index is not None

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every tensor, in the order of the internal file."""
        return tuple(n for s in self.shards for n in s.tensors)

    def weight_map(self) -> dict[str, str]:
        return {n: s.file for s in self.shards for n in s.tensors}


def parse_index(raw: bytes, name: str) -> tuple[dict[str, str], IndexLayout]:
    """An index file's ``weight_map`` (tensor -> shard file) and its ``IndexLayout``.

    Pure. Other top-level keys than ``weight_map`` and ``metadata`` are not kept.
    """

    def bad(why: str) -> ModelFormatError:
        return ModelFormatError(f"shard index {name!r}: {why}")

    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise bad("expected an object with a 'weight_map' object (tensor -> shard file)")
    weight_map: dict[str, object] = obj["weight_map"]
    if not weight_map:
        raise bad("its weight_map is empty")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise bad(f"tensor {tensor!r} maps to {type(shard).__name__}, not a file name")
        check_file_name(shard, f"index {name!r}: shard file of tensor {tensor!r},")
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise bad(f"its 'metadata' must be an object, got {type(meta).__name__}")
    files = {str(v) for v in weight_map.values()}
    if name in files:
        raise bad("it names itself as a shard")
    return {k: str(v) for k, v in weight_map.items()}, IndexLayout(file=name, metadata=meta)


def shard_order(weight_map: Mapping[str, str]) -> list[str]:
    """The shard files of an index, in the internal order: sorted by name."""
    return sorted(set(weight_map.values()))


def describe(
    shards: Sequence[tuple[str, FileHeader]],
    index: IndexLayout | None = None,
    weight_map: Mapping[str, str] | None = None,
) -> CheckpointLayout:
    """The ``CheckpointLayout`` of files whose headers are given (file name, header), in
    internal order; with an index, its ``weight_map`` must name exactly these tensors
    in these files. Pure."""
    out = CheckpointLayout(
        shards=tuple(
            ShardLayout(
                file=f, tensors=tuple(t.name for t in h.layout.tensors), metadata=h.metadata
            )
            for f, h in shards
        ),
        index=index,
    )
    if weight_map is not None:
        have = out.weight_map()
        for tensor, shard in weight_map.items():
            if have.get(tensor) != shard:
                where = f"in {have[tensor]!r}" if tensor in have else "in no shard"
                raise ModelFormatError(
                    f"shard index: tensor {tensor!r} is listed in {shard!r} but is {where}"
                )
        for tensor, shard in have.items():
            if tensor not in weight_map:
                raise ModelFormatError(
                    f"shard {shard!r} holds tensor {tensor!r}, which its index does not list"
                )
    return out


def internal_metadata(layout: CheckpointLayout) -> dict[str, str] | None:
    """The ``__metadata__`` of the internal file: a single file's own; for shards, the
    one all shards share (``{"format": "pt"}`` from transformers), else none (each
    shard's is in the layout)."""
    first = layout.shards[0].metadata
    return first if all(s.metadata == first for s in layout.shards) else None


def single_file(
    name: str, tensors: Sequence[str], metadata: dict[str, str] | None = None
) -> CheckpointLayout:
    return CheckpointLayout(
        shards=(ShardLayout(file=name, tensors=tuple(tensors), metadata=metadata),)
    )


def copy_range(
    src_fd: int,
    dst: BinaryIO,
    start: int,
    length: int,
    buf: bytearray,
    feed: Callable[[memoryview], None] | None = None,
) -> None:
    """Copy ``length`` bytes of ``src_fd`` from ``start`` to ``dst``'s position, through
    ``buf`` (the only memory it takes), handing every piece to ``feed`` too."""
    while length:
        view = memoryview(buf)[: min(length, len(buf))]
        got = os.preadv(src_fd, [view], start)
        if got == 0:
            raise ModelFormatError(f"a model file ended {length} bytes early while it was copied")
        view = view[:got]
        if feed is not None:
            feed(view)
        while view:
            view = view[dst.write(view) or 0 :]
        start, length = start + got, length - got


def _write_atomic(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``path.part`` and rename: a crash leaves no half file
    under the final name."""
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def index_bytes(layout: CheckpointLayout, sizes: Mapping[str, int]) -> bytes:
    """The index file, as transformers writes one (2-space indent, sorted keys);
    ``total_size``, if the input's had one, is the sum of the tensors' bytes again."""
    assert layout.index is not None
    obj: dict[str, object] = {"weight_map": layout.weight_map()}
    if layout.index.metadata is not None:
        meta = dict(layout.index.metadata)
        if TOTAL_SIZE in meta:
            meta[TOTAL_SIZE] = sum(sizes[n] for n in layout.tensors)
        obj["metadata"] = meta
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_checkpoint(
    model: Path, layout: CheckpointLayout, out: Path, chunk_bytes: int
) -> list[Path]:
    """Write the internal file ``model`` out in ``layout``; return the files written.

    ``out`` is the file for a single-file checkpoint, the directory (made if absent)
    for shards, which gets every shard and the index. Each file is written through a
    temporary and renamed; the memory taken is one buffer of ``chunk_bytes``, whatever
    the size of a tensor. Blocking: call from a thread.
    """
    for s in layout.shards:
        check_file_name(s.file)
    if layout.index is not None:
        check_file_name(layout.index.file, "index file")
    header = read_header(model)
    specs = {t.name: t for t in header.layout.tensors}
    missing = [n for n in layout.tensors if n not in specs]
    extra = sorted(set(specs) - set(layout.tensors))
    if missing or extra:
        raise ModelFormatError(
            f"{model} does not hold the checkpoint's tensors: missing {missing[:5]}, "
            f"not in the checkpoint {extra[:5]}"
        )
    buf = bytearray(max(1, chunk_bytes))
    written: list[Path] = []
    fd = os.open(model, os.O_RDONLY)
    try:
        if not layout.is_sharded:
            paths = [out]
        else:
            out.mkdir(parents=True, exist_ok=True)
            paths = [out / s.file for s in layout.shards]
        for path, shard in zip(paths, layout.shards, strict=True):
            tensors = [specs[n] for n in shard.tensors]
            _write_atomic(path, partial(_fill_shard, tensors, shard.metadata, fd, header, buf))
            written.append(path)
    finally:
        os.close(fd)
    if layout.index is not None:
        data = index_bytes(layout, {n: s.nbytes for n, s in specs.items()})
        index = out / layout.index.file
        _write_atomic(index, lambda f: f.write(data))
        written.append(index)
    fsync_dir(written[-1].parent)
    return written


def _fill_shard(
    tensors: Sequence[TensorSpec],
    metadata: dict[str, str] | None,
    src_fd: int,
    src: FileHeader,
    buf: bytearray,
    f: BinaryIO,
) -> None:
    _, head = plan_layout([(t.name, t.dtype, t.shape) for t in tensors], metadata)
    f.write(head)
    for t in tensors:
        copy_range(src_fd, f, src.layout.data_offset + t.begin, t.nbytes, buf)
