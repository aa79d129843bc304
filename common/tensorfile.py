"""The model file format: safetensors layout, and the manifest that describes a file.

A file is an 8-byte little-endian header length N, N bytes of JSON header, then the raw
little-endian tensor bytes, contiguous, in the order of the header's ``data_offsets``.
Anyone can open it with ``safetensors.numpy.load_file``. ``parse_file_header`` reads
every header the safetensors library reads (any spacing, key order, padding,
``__metadata__``); ``plan_layout`` writes one layout only, the server's own (compact
JSON, ``__metadata__`` first, tensors in data order, padded with spaces to a multiple
of 8). Files are compared by layout, so every model inside a job has that layout
(``fl_server.modelgen`` rewrites a user's file into it; ``common.checkpoint`` writes it
back out in the user's). This module is pure: bytes and values in, values out.

The manifest adds what moving the file needs: its size, the segment size, one digest
per segment and the whole digest. It travels as JSON in tasks.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import ml_dtypes
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.errors import ModelFormatError, UpdateRejected

HEADER_LEN_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024
FORMAT_VERSION = 1

# Every safetensors tensor type the system takes, as little-endian numpy dtypes. BF16
# comes from ml_dtypes, the maintained numpy extension for bfloat16.
_DTYPES: dict[str, np.dtype[np.generic]] = {
    st: np.dtype(dt).newbyteorder("<")
    for st, dt in {
        "F64": np.float64,
        "F32": np.float32,
        "F16": np.float16,
        "BF16": ml_dtypes.bfloat16,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U64": np.uint64,
        "U32": np.uint32,
        "U16": np.uint16,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }.items()
}
_ST_BY_NUMPY = {v.name: k for k, v in _DTYPES.items()}
# Averaged: summed in float64, the average rounded to nearest, ties to even, into the
# tensor's own type (``fl_server.aggregate``).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# Carried: integer and bool tensors (step counters, masks, token ids) are not averaged;
# every update must hold the round's global model's bytes, which the next one keeps.
CARRIED_DTYPES = frozenset(_DTYPES) - FLOAT_DTYPES

# safetensors types refused, with the reason: a model holding one fails at its header
_REFUSED: dict[str, str] = {
    **dict.fromkeys(
        ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"),
        "8-bit floats are not averaged here (their rounding from float64 is not verified)",
    ),
    **dict.fromkeys(
        ("F4", "F6_E2M3", "F6_E3M2"),
        "sub-byte floats pack several values per byte and cannot be averaged chunk by chunk",
    ),
    "C64": "complex tensors have no average defined here",
}


def numpy_dtype(st_dtype: str) -> np.dtype[np.generic]:
    try:
        return _DTYPES[st_dtype]
    except KeyError:
        why = _REFUSED.get(st_dtype, "it is not a safetensors tensor type")
        raise ModelFormatError(
            f"unsupported tensor dtype {st_dtype!r}: {why}; supported: {', '.join(_DTYPES)}"
        ) from None


def numpy_dtype_named(name: str) -> np.dtype[np.generic]:
    """The dtype numpy calls ``name`` ("bfloat16", "float32", ...), if the format takes it."""
    return numpy_dtype(_ST_BY_NUMPY.get(name, name))


def st_dtype(dtype: np.dtype[np.generic] | str) -> str:
    name = np.dtype(dtype).name
    try:
        return _ST_BY_NUMPY[name]
    except KeyError:
        raise ModelFormatError(f"unsupported numpy dtype {name!r}") from None


class TensorSpec(BaseModel):
    """One tensor: ``begin``/``end`` are byte offsets relative to the start of the data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    dtype: str
    shape: tuple[Annotated[int, Field(ge=0)], ...]
    begin: int = Field(ge=0)
    end: int = Field(ge=0)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def np_dtype(self) -> np.dtype[np.generic]:
        return numpy_dtype(self.dtype)

    @property
    def averaged(self) -> bool:
        """Whether updates are averaged into it (floats) or carry it unchanged (the rest)."""
        return self.dtype in FLOAT_DTYPES


class Layout(BaseModel):
    """Where every tensor lies in a file; equal layouts mean byte-compatible files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tensors: tuple[TensorSpec, ...]
    data_offset: int = Field(description="Bytes before the first tensor byte (8 + header).")

    @property
    def data_bytes(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_bytes

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise ModelFormatError(f"no tensor named {name!r} in the model")


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = FORMAT_VERSION
    layout: Layout
    segment_bytes: int = Field(gt=0)
    segment_digests: tuple[str, ...]
    digest: str

    @property
    def file_size(self) -> int:
        return self.layout.file_size

    @property
    def num_segments(self) -> int:
        return len(self.segment_digests)


def plan_layout(
    tensors: Sequence[tuple[str, str, Sequence[int]]],
    metadata: dict[str, str] | None = None,
) -> tuple[Layout, bytes]:
    """Lay out tensors ``(name, st_dtype, shape)`` in order; return layout and header bytes."""
    names = [n for n, _, _ in tensors]
    if len(set(names)) != len(names):
        raise ModelFormatError("tensor names must be unique")
    specs: list[TensorSpec] = []
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for name, dtype, shape in tensors:
        if name == "__metadata__":
            raise ModelFormatError("'__metadata__' is reserved and cannot name a tensor")
        size = math.prod(shape) * numpy_dtype(dtype).itemsize
        specs.append(
            TensorSpec(name=name, dtype=dtype, shape=tuple(shape), begin=pos, end=pos + size)
        )
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    return Layout(tensors=tuple(specs), data_offset=len(head)), head


def header_length(prefix: bytes) -> int:
    if len(prefix) < HEADER_LEN_BYTES:
        raise ModelFormatError("file is shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", prefix[:HEADER_LEN_BYTES])
    if n > MAX_HEADER_BYTES:
        # the number is not shown: read from any file, it would echo that file's bytes
        raise ModelFormatError(
            "the first 8 bytes do not hold a safetensors header length: the length they "
            f"give exceeds the {MAX_HEADER_BYTES} byte limit"
        )
    return int(n)


def _is_count(value: object) -> bool:
    """A JSON integer >= 0; ``true`` and ``1.0`` are not (Python would take them as 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(name: str, entry: object) -> TensorSpec:
    """One header entry as a ``TensorSpec``, or a ``ModelFormatError`` naming the tensor.

    Every value is checked here, before ``TensorSpec`` sees it, so that a hostile or
    broken file never surfaces as a pydantic error and never gets an impossible shape
    through lax coercion (``int(1.7)``, ``int(True)``).
    """

    def malformed(why: str) -> ModelFormatError:
        return ModelFormatError(f"tensor {name!r}: header entry is malformed: {why}")

    if not isinstance(entry, dict):
        raise malformed(f"expected an object, got {type(entry).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise malformed(f"{key!r} is missing")
    if not name:
        raise malformed("the tensor name is empty")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise malformed(f"dtype must be a string such as 'F32', got {dtype!r}")
    try:
        numpy_dtype(dtype)
    except ModelFormatError as exc:
        raise ModelFormatError(f"tensor {name!r}: {exc}") from None
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise malformed(f"shape must be a list of non-negative integers, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(x) for x in offsets)
        or offsets[0] > offsets[1]
    ):
        raise malformed(
            f"data_offsets must be [begin, end], non-negative integers with begin <= end, "
            f"got {offsets!r}"
        )
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


@dataclass(frozen=True)
class FileHeader:
    """What a file's header says: where its tensors lie, and its ``__metadata__``."""

    layout: Layout
    metadata: dict[str, str] | None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads`` keeps the last of two equal keys; a header that names a tensor twice
    is ambiguous (readers disagree on which one is meant), so it is refused."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ModelFormatError(f"header names {key!r} twice")
        out[key] = value
    return out


def _parse_metadata(value: object) -> dict[str, str] | None:
    """``__metadata__``: a JSON object of strings to strings (``null`` reads as none), as
    the safetensors library reads it."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ModelFormatError(
            f"header's '__metadata__' must be an object of strings, got {type(value).__name__}"
        )
    for key, v in value.items():
        if not isinstance(v, str):
            raise ModelFormatError(
                f"header's '__metadata__' must be an object of strings: {key!r} is "
                f"{type(v).__name__}"
            )
    return dict(value)


def parse_file_header(head: bytes, *, file_size: int | None) -> FileHeader:
    """Parse and validate the header bytes (length prefix included) of any valid file.

    Valid is what the safetensors library reads: any JSON spacing and key order, padding
    with spaces, ``__metadata__`` anywhere in the object, tensors listed in any order
    as long as their ``data_offsets``, sorted, cover the data from byte 0 to its end
    without a gap or an overlap. The layout lists the tensors in data order.
    ``file_size=None`` skips the check against the file's size, for a header read
    before the rest of the file has arrived.
    """
    n = header_length(head)
    if len(head) < HEADER_LEN_BYTES + n:
        raise ModelFormatError("file ends inside its header")
    try:
        obj = json.loads(
            head[HEADER_LEN_BYTES : HEADER_LEN_BYTES + n], object_pairs_hook=_no_duplicates
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ModelFormatError("header must be a JSON object")
    metadata = _parse_metadata(obj.get("__metadata__"))
    specs: list[TensorSpec] = []
    for name, entry in obj.items():
        if name == "__metadata__":
            continue
        spec = _parse_entry(name, entry)
        if spec.numel * spec.np_dtype.itemsize != spec.nbytes:
            raise ModelFormatError(
                f"tensor {name!r}: shape {list(spec.shape)} of {spec.dtype} needs "
                f"{spec.numel * spec.np_dtype.itemsize} bytes, offsets give {spec.nbytes}"
            )
        specs.append(spec)
    specs.sort(key=lambda s: (s.begin, s.end))
    pos = 0
    for s in specs:
        if s.begin != pos:
            how = (
                f"a gap of {s.begin - pos} bytes before it"
                if s.begin > pos
                else f"it begins {pos - s.begin} bytes inside the tensor before it"
            )
            raise ModelFormatError(
                f"tensor {s.name!r}: data is not contiguous at byte {pos} ({how})"
            )
        pos = s.end
    layout = Layout(tensors=tuple(specs), data_offset=HEADER_LEN_BYTES + n)
    if file_size is not None and layout.file_size != file_size:
        raise ModelFormatError(
            f"file is {file_size} bytes but its header describes {layout.file_size}"
        )
    return FileHeader(layout=layout, metadata=metadata)


def parse_header(head: bytes, *, file_size: int | None) -> Layout:
    """The layout of ``parse_file_header``: where every tensor lies."""
    return parse_file_header(head, file_size=file_size).layout


def check_same_layout(got: Layout, expected: Layout) -> None:
    """Reject an update whose tensors differ from the task's model, naming the first difference."""
    want = {t.name: t for t in expected.tensors}
    have = {t.name: t for t in got.tensors}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        raise UpdateRejected(f"update is missing tensor(s) {missing}", field="tensors")
    if extra:
        raise UpdateRejected(f"update has unexpected tensor(s) {extra}", field="tensors")
    for name, w in want.items():
        h = have[name]
        if h.dtype != w.dtype:
            raise UpdateRejected(
                f"tensor {name!r} has dtype {h.dtype}, expected {w.dtype}", field="tensors"
            )
        if h.shape != w.shape:
            raise UpdateRejected(
                f"tensor {name!r} has shape {list(h.shape)}, expected {list(w.shape)}",
                field="tensors",
            )
    if got != expected:
        raise UpdateRejected("update's tensors are laid out differently from the model's")


def element_window(spec: TensorSpec, max_bytes: int) -> int:
    """Elements per chunk when walking a tensor in chunks of at most ``max_bytes``."""
    return max(1, max_bytes // spec.np_dtype.itemsize)
