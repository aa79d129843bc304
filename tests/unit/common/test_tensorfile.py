"""Unit tests for common.tensorfile: safetensors layout, header parsing, layout checks."""

from __future__ import annotations

import json
import struct
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pydantic
import pytest
import safetensors.numpy

from common.errors import ModelFormatError, UpdateRejected
from common.tensorfile import (
    CARRIED_DTYPES,
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    Layout,
    TensorSpec,
    check_same_layout,
    element_window,
    header_length,
    numpy_dtype,
    numpy_dtype_named,
    parse_file_header,
    parse_header,
    plan_layout,
    st_dtype,
)

TENSORS = [
    ("a", "F32", (2, 3)),  # 24 bytes
    ("b", "F16", (5,)),  # 10 bytes
    ("c", "I64", ()),  # 8 bytes
    ("d", "BOOL", (3,)),  # 3 bytes
    ("e", "U8", (0,)),  # 0 bytes
    ("f", "F64", (1, 2)),  # 16 bytes
]


def _head(obj: object, *, pad: bool = True) -> bytes:
    raw = json.dumps(obj).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# --- dtype mapping -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("st", "np_name", "itemsize"),
    [
        ("F64", "float64", 8),
        ("F32", "float32", 4),
        ("F16", "float16", 2),
        ("I64", "int64", 8),
        ("I32", "int32", 4),
        ("I16", "int16", 2),
        ("I8", "int8", 1),
        ("U8", "uint8", 1),
        ("U16", "uint16", 2),
        ("U32", "uint32", 4),
        ("U64", "uint64", 8),
        ("BOOL", "bool", 1),
        ("BF16", "bfloat16", 2),
    ],
)
def test_dtype_mapping(st: str, np_name: str, itemsize: int) -> None:
    dt = numpy_dtype(st)
    assert dt.name == np_name
    assert dt.itemsize == itemsize
    assert dt == np.dtype(np_name).newbyteorder("<")
    assert st_dtype(dt) == st
    assert st_dtype(np_name) == st
    assert st_dtype(np.dtype(np_name)) == st


def test_numpy_dtype_is_little_endian() -> None:
    assert numpy_dtype("F32") == np.dtype("<f4")
    assert numpy_dtype("I64") == np.dtype("<i8")


def test_float_dtypes() -> None:
    assert frozenset({"F64", "F32", "F16", "BF16"}) == FLOAT_DTYPES
    assert (
        frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"}) == CARRIED_DTYPES
    )


def test_bf16_is_ml_dtypes_bfloat16() -> None:
    assert numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16)
    assert st_dtype(ml_dtypes.bfloat16) == "BF16"
    assert numpy_dtype_named("bfloat16") == numpy_dtype("BF16")
    assert numpy_dtype_named("float16") == numpy_dtype("F16")
    # 1.0 in bfloat16 is 0x3F80, little-endian on disk
    assert np.array([1.0], dtype=numpy_dtype("BF16")).tobytes() == b"\x80\x3f"


@pytest.mark.parametrize(
    ("st", "why"),
    [
        ("F8_E4M3", "8-bit floats"),
        ("F8_E5M2", "8-bit floats"),
        ("F8_E8M0", "8-bit floats"),
        ("F4", "sub-byte floats"),
        ("F6_E3M2", "sub-byte floats"),
        ("C64", "complex"),
        ("F128", "not a safetensors tensor type"),
    ],
)
def test_refused_dtypes_say_why(st: str, why: str) -> None:
    with pytest.raises(ModelFormatError, match=f"unsupported tensor dtype {st!r}: .*{why}"):
        numpy_dtype(st)


@pytest.mark.parametrize("bad", ["C64", "F8_E4M3", "f32", "", "bf16"])
def test_numpy_dtype_unsupported(bad: str) -> None:
    with pytest.raises(ModelFormatError, match="unsupported tensor dtype") as exc:
        numpy_dtype(bad)
    assert repr(bad) in str(exc.value)
    assert "F32" in str(exc.value)  # lists the supported ones


@pytest.mark.parametrize("bad", [np.complex64, ml_dtypes.float8_e4m3fn, np.longdouble, "U5"])
def test_st_dtype_unsupported(bad: object) -> None:
    with pytest.raises(ModelFormatError, match="unsupported numpy dtype"):
        st_dtype(bad)  # type: ignore[arg-type]


# --- plan_layout / parse_header ------------------------------------------------------


def test_plan_layout_offsets_exact() -> None:
    layout, head = plan_layout(TENSORS)
    got = [(t.name, t.dtype, t.shape, t.begin, t.end) for t in layout.tensors]
    assert got == [
        ("a", "F32", (2, 3), 0, 24),
        ("b", "F16", (5,), 24, 34),
        ("c", "I64", (), 34, 42),
        ("d", "BOOL", (3,), 42, 45),
        ("e", "U8", (0,), 45, 45),
        ("f", "F64", (1, 2), 45, 61),
    ]
    assert layout.data_offset == len(head)
    assert layout.data_bytes == 61
    assert layout.file_size == len(head) + 61
    assert [t.nbytes for t in layout.tensors] == [24, 10, 8, 3, 0, 16]
    assert [t.numel for t in layout.tensors] == [6, 5, 1, 3, 0, 2]


def test_plan_layout_header_bytes() -> None:
    _, head = plan_layout(TENSORS, metadata={"round": "3"})
    (n,) = struct.unpack("<Q", head[:8])
    assert n == len(head) - 8
    assert n % 8 == 0
    assert len(head) % 8 == 0
    body = head[8:]
    stripped = body.rstrip(b" ")
    assert body[len(stripped) :] == b" " * (len(body) - len(stripped))
    assert len(body) - len(stripped) < 8
    obj = json.loads(body)
    assert obj["__metadata__"] == {"round": "3"}
    assert obj["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert obj["f"] == {"dtype": "F64", "shape": [1, 2], "data_offsets": [45, 61]}
    assert list(obj) == ["__metadata__", "a", "b", "c", "d", "e", "f"]


@pytest.mark.parametrize("extra", range(8))
def test_header_padded_to_multiple_of_8_for_all_lengths(extra: int) -> None:
    _, head = plan_layout([("x" * (1 + extra), "F32", (1,))])
    assert (len(head) - 8) % 8 == 0


@pytest.mark.parametrize("metadata", [None, {"k": "v", "format": "np"}])
def test_round_trip(metadata: dict[str, str] | None) -> None:
    layout, head = plan_layout(TENSORS, metadata)
    parsed = parse_header(head, file_size=layout.file_size)
    assert parsed == layout
    # The head followed by data parses the same (only the declared header is read).
    assert parse_header(head + b"\0" * layout.data_bytes, file_size=layout.file_size) == layout


def test_empty_layout_round_trip() -> None:
    layout, head = plan_layout([])
    assert layout.tensors == ()
    assert layout.data_bytes == 0
    assert layout.file_size == len(head)
    assert parse_header(head, file_size=len(head)) == layout


def test_parse_header_of_a_safetensors_library_file() -> None:
    values: dict[str, npt.NDArray[Any]] = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones(3, dtype=np.float64),
        "n": np.array([1, 2, 3], dtype=np.int16),
    }
    blob = safetensors.numpy.save(values, metadata={"m": "1"})
    layout = parse_header(blob, file_size=len(blob))
    assert layout.file_size == len(blob)
    assert {t.name for t in layout.tensors} == {"w", "b", "n"}
    for t in layout.tensors:
        arr = values[t.name]
        assert t.shape == arr.shape
        assert t.np_dtype == arr.dtype
        start = layout.data_offset + t.begin
        got = np.frombuffer(blob[start : layout.data_offset + t.end], dtype=t.np_dtype)
        np.testing.assert_array_equal(got.reshape(t.shape), arr)


def test_parse_header_sorts_by_offset() -> None:
    head = _head({"second": _entry("F32", [1], 4, 8), "first": _entry("F32", [1], 0, 4)})
    layout = parse_header(head, file_size=len(head) + 8)
    assert [t.name for t in layout.tensors] == ["first", "second"]


def test_parse_header_accepts_unpadded_header() -> None:
    head = _head({"a": _entry("U8", [3], 0, 3)}, pad=False)
    layout = parse_header(head, file_size=len(head) + 3)
    assert layout.data_offset == len(head)


def test_plan_layout_rejects_duplicates_and_reserved_name() -> None:
    with pytest.raises(ModelFormatError, match="unique"):
        plan_layout([("a", "F32", (1,)), ("a", "F32", (2,))])
    with pytest.raises(ModelFormatError, match="__metadata__"):
        plan_layout([("__metadata__", "F32", (1,))])
    with pytest.raises(ModelFormatError, match="unsupported tensor dtype 'F8_E4M3'"):
        plan_layout([("a", "F8_E4M3", (1,))])


@pytest.mark.parametrize("delta", [-1, 1, 8, -61])
def test_parse_header_rejects_wrong_file_size(delta: int) -> None:
    layout, head = plan_layout(TENSORS)
    with pytest.raises(ModelFormatError) as exc:
        parse_header(head, file_size=layout.file_size + delta)
    assert f"file is {layout.file_size + delta} bytes" in str(exc.value)
    assert f"describes {layout.file_size}" in str(exc.value)


def test_parse_header_rejects_gap() -> None:
    head = _head({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)})
    with pytest.raises(ModelFormatError, match=r"tensor 'b': data is not contiguous at byte 4"):
        parse_header(head, file_size=len(head) + 12)


def test_parse_header_rejects_data_not_starting_at_zero() -> None:
    head = _head({"a": _entry("F32", [1], 4, 8)})
    with pytest.raises(ModelFormatError, match=r"'a': data is not contiguous at byte 0"):
        parse_header(head, file_size=len(head) + 8)


def test_parse_header_rejects_overlap() -> None:
    head = _head({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)})
    with pytest.raises(ModelFormatError, match="not contiguous"):
        parse_header(head, file_size=len(head) + 12)


def test_parse_header_rejects_shape_offset_mismatch() -> None:
    head = _head({"a": _entry("F32", [2, 3], 0, 20)})
    with pytest.raises(ModelFormatError) as exc:
        parse_header(head, file_size=len(head) + 20)
    msg = str(exc.value)
    assert "tensor 'a'" in msg
    assert "needs 24 bytes" in msg
    assert "offsets give 20" in msg


def test_parse_header_rejects_unsupported_dtype() -> None:
    head = _head({"a": _entry("C64", [2], 0, 16)})
    with pytest.raises(ModelFormatError, match="unsupported tensor dtype 'C64'"):
        parse_header(head, file_size=len(head) + 4)


@pytest.mark.parametrize(
    "body",
    [b'{"a": ', b"\xff\xfe\x00\x01", b"not json at all!"],
    ids=["truncated", "not-utf8", "garbage"],
)
def test_parse_header_rejects_bad_json(body: bytes) -> None:
    head = struct.pack("<Q", len(body)) + body
    with pytest.raises(ModelFormatError, match="header is not valid JSON"):
        parse_header(head, file_size=len(head))


@pytest.mark.parametrize("obj", [[1, 2], "x", 3, None])
def test_parse_header_rejects_non_object(obj: object) -> None:
    head = _head(obj)
    with pytest.raises(ModelFormatError, match="header must be a JSON object"):
        parse_header(head, file_size=len(head))


@pytest.mark.parametrize(
    "entry",
    [
        {"shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
        {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]},
        "just a string",
        [1, 2, 3],
    ],
    ids=[
        "no-dtype",
        "no-shape",
        "no-offsets",
        "3-offsets",
        "1-offset",
        "shape-int",
        "shape-str",
        "entry-str",
        "entry-list",
    ],
)
def test_parse_header_rejects_malformed_entry(entry: object) -> None:
    head = _head({"t": entry})
    with pytest.raises(ModelFormatError, match=r"tensor 't': header entry is malformed"):
        parse_header(head, file_size=len(head) + 4)


def test_header_length_limits() -> None:
    ok = struct.pack("<Q", MAX_HEADER_BYTES)
    assert header_length(ok) == MAX_HEADER_BYTES
    assert header_length(struct.pack("<Q", 16) + b"rest") == 16
    with pytest.raises(ModelFormatError, match="exceeds") as exc:
        header_length(struct.pack("<Q", MAX_HEADER_BYTES + 1))
    # the number is the file's first bytes: a message showing it would echo any file
    assert str(MAX_HEADER_BYTES + 1) not in str(exc.value)
    with pytest.raises(ModelFormatError, match="exceeds"):
        header_length(b"\xff" * 8)


def test_parse_header_rejects_header_over_limit() -> None:
    head = struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}"
    with pytest.raises(ModelFormatError, match="exceeds"):
        parse_header(head, file_size=10**12)


@pytest.mark.parametrize("n", range(8))
def test_parse_header_rejects_shorter_than_8_bytes(n: int) -> None:
    with pytest.raises(ModelFormatError, match="shorter than the 8-byte"):
        parse_header(b"\x02" * n, file_size=n)


def test_parse_header_rejects_file_ending_inside_header() -> None:
    _, head = plan_layout(TENSORS)
    with pytest.raises(ModelFormatError, match="ends inside its header"):
        parse_header(head[:-1], file_size=len(head) - 1)


@pytest.mark.parametrize(
    ("obj", "name", "words"),
    [
        ({"a": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}, "a", "dtype must be a string"),
        ({"": _entry("F32", [1], 0, 4)}, "", "the tensor name is empty"),
        ({"a": _entry("F32", [1], -4, 0)}, "a", "data_offsets must be"),
        ({"a": _entry("F32", [1], 4, 0)}, "a", "begin <= end"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}}, "a", "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}, "a", "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}}, "a", "data_offsets"),
        ({"a": {"dtype": None, "shape": [1], "data_offsets": [0, 4]}}, "a", "dtype must be"),
    ],
    ids=[
        "dtype-not-str",
        "empty-name",
        "negative-offset",
        "offsets-reversed",
        "float-offset",
        "bool-offset",
        "offsets-str",
        "dtype-null",
    ],
)
def test_parse_header_bad_values_raise_model_format_error(
    obj: object, name: str, words: str
) -> None:
    head = _head(obj)
    with pytest.raises(ModelFormatError) as exc:
        parse_header(head, file_size=len(head) + 4)
    assert str(exc.value).startswith(f"tensor {name!r}: header entry is malformed: ")
    assert words in str(exc.value)


@pytest.mark.parametrize(
    "shape",
    [[-1, -1], [1.7], [True], [1.0], ["1"], [None], [1, -1]],
    ids=["negative", "fractional", "bool", "integral-float", "str", "null", "one-negative"],
)
def test_parse_header_rejects_invalid_dims(shape: list[object]) -> None:
    head = _head({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}})
    with pytest.raises(ModelFormatError) as exc:
        parse_header(head, file_size=len(head) + 4)
    assert "tensor 'a'" in str(exc.value)
    assert "shape must be a list of non-negative integers" in str(exc.value)


def test_parse_header_unsupported_dtype_names_tensor() -> None:
    head = _head({"w": _entry("F8_E5M2", [2], 0, 2)})
    with pytest.raises(ModelFormatError, match=r"^tensor 'w': unsupported tensor dtype 'F8_E5M2'"):
        parse_header(head, file_size=len(head) + 4)


def test_parse_header_accepts_zero_dims() -> None:
    head = _head({"e": _entry("F32", [0, 3], 0, 0), "a": _entry("U8", [2], 0, 2)})
    layout = parse_header(head, file_size=len(head) + 2)
    assert [(t.name, t.shape) for t in layout.tensors] == [("e", (0, 3)), ("a", (2,))]


# --- Layout helpers ------------------------------------------------------------------


def test_layout_tensor_lookup() -> None:
    layout, _ = plan_layout(TENSORS)
    assert layout.tensor("d").begin == 42
    with pytest.raises(ModelFormatError, match="no tensor named 'zz'"):
        layout.tensor("zz")


def test_tensor_spec_properties() -> None:
    spec = TensorSpec(name="w", dtype="F16", shape=(3, 4), begin=8, end=32)
    assert spec.nbytes == 24
    assert spec.numel == 12
    assert spec.np_dtype == np.dtype("<f2")


def test_tensor_spec_rejects_negative_dims() -> None:
    """TensorSpec also arrives in manifests over the wire: the bound lives in the type."""
    with pytest.raises(pydantic.ValidationError):
        TensorSpec(name="w", dtype="F32", shape=(2, -1), begin=0, end=0)


@pytest.mark.parametrize(
    ("dtype", "max_bytes", "window"),
    [("F32", 16, 4), ("F32", 17, 4), ("F32", 3, 1), ("F64", 8, 1), ("U8", 5, 5), ("F16", 1, 1)],
)
def test_element_window(dtype: str, max_bytes: int, window: int) -> None:
    spec = TensorSpec(name="t", dtype=dtype, shape=(100,), begin=0, end=0)
    assert element_window(spec, max_bytes) == window


# --- check_same_layout ---------------------------------------------------------------


def _layout(tensors: list[tuple[str, str, tuple[int, ...]]], **kw: object) -> Layout:
    return plan_layout(tensors, **kw)[0]  # type: ignore[arg-type]


BASE = [("w", "F32", (4, 4)), ("b", "F32", (4,)), ("step", "I64", ())]


def test_check_same_layout_accepts_equal() -> None:
    check_same_layout(_layout(BASE), _layout(BASE))


def test_check_same_layout_missing_tensor() -> None:
    with pytest.raises(UpdateRejected) as exc:
        check_same_layout(_layout(BASE[:2]), _layout(BASE))
    assert "missing" in str(exc.value)
    assert "'step'" in str(exc.value)
    assert exc.value.field == "tensors"


def test_check_same_layout_extra_tensor() -> None:
    with pytest.raises(UpdateRejected) as exc:
        check_same_layout(_layout([*BASE, ("bonus", "U8", (1,))]), _layout(BASE))
    assert "unexpected" in str(exc.value)
    assert "'bonus'" in str(exc.value)
    assert exc.value.field == "tensors"


def test_check_same_layout_wrong_dtype() -> None:
    got = [("w", "F32", (4, 4)), ("b", "F64", (4,)), ("step", "I64", ())]
    with pytest.raises(UpdateRejected) as exc:
        check_same_layout(_layout(got), _layout(BASE))
    msg = str(exc.value)
    assert "tensor 'b'" in msg
    assert "dtype F64" in msg
    assert "expected F32" in msg
    assert exc.value.field == "tensors"


def test_check_same_layout_wrong_shape() -> None:
    got = [("w", "F32", (2, 8)), ("b", "F32", (4,)), ("step", "I64", ())]
    with pytest.raises(UpdateRejected) as exc:
        check_same_layout(_layout(got), _layout(BASE))
    msg = str(exc.value)
    assert "tensor 'w'" in msg
    assert "shape [2, 8]" in msg
    assert "expected [4, 4]" in msg


def test_check_same_layout_different_order() -> None:
    got = [BASE[1], BASE[0], BASE[2]]
    with pytest.raises(UpdateRejected, match="laid out differently"):
        check_same_layout(_layout(got), _layout(BASE))


def test_check_same_layout_different_header_size() -> None:
    with pytest.raises(UpdateRejected, match="laid out differently"):
        check_same_layout(_layout(BASE, metadata={"pad": "x" * 40}), _layout(BASE))


# --- headers as other tools write them -------------------------------------------------


def test_a_safetensors_library_file_parses_with_its_metadata() -> None:
    values: dict[str, npt.NDArray[Any]] = {
        "w": np.ones((2, 3), dtype=np.float32),
        "b": np.arange(3, dtype=np.int64),
    }
    blob = safetensors.numpy.save(values, metadata={"format": "pt", "note": "x y"})
    header = parse_file_header(blob, file_size=len(blob))
    assert header.metadata == {"format": "pt", "note": "x y"}
    assert {t.name for t in header.layout.tensors} == {"w", "b"}


def _hand_made(text: str, data_bytes: int) -> tuple[bytes, int]:
    raw = text.encode()
    head = struct.pack("<Q", len(raw)) + raw
    return head, len(head) + data_bytes


@pytest.mark.parametrize(
    "text",
    [
        # keys in another order than the data, metadata last, pretty-printed
        '{\n  "b": {"data_offsets": [8, 12], "shape": [1], "dtype": "F32"},\n'
        '  "a": {"shape": [2], "dtype": "F32", "data_offsets": [0, 8]},\n'
        '  "__metadata__": {"format": "pt"}\n}',
        # leading spaces, spaces everywhere, long trailing padding
        '   { "__metadata__" : { "format" : "pt" } , "a" : { "dtype" : "F32" , "shape" : [ 2 ] ,'
        ' "data_offsets" : [ 0 , 8 ] } , "b" : { "dtype" : "F32" , "shape" : [ 1 ] , '
        '"data_offsets" : [ 8 , 12 ] } }' + " " * 61,
        # unpadded, compact, metadata in the middle, an extra key in an entry
        '{"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12],"x":1},'
        '"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    ],
    ids=["reordered-pretty", "spaced-padded", "compact-extra-key"],
)
def test_parse_file_header_accepts_any_valid_spacing_order_and_padding(text: str) -> None:
    head, size = _hand_made(text, 12)
    data = np.arange(3, dtype=np.float32).tobytes()
    assert set(safetensors.numpy.load(head + data)) == {"a", "b"}  # the library reads it
    header = parse_file_header(head, file_size=size)
    assert [t.name for t in header.layout.tensors] == ["a", "b"]
    assert header.metadata == {"format": "pt"}
    assert header.layout.data_offset == len(head)


def test_offsets_listed_out_of_order_with_zero_size_tensors_parse_in_data_order() -> None:
    obj = {
        "z": _entry("F32", [0], 4, 4),
        "last": _entry("U8", [2], 4, 6),
        "first": _entry("F32", [1], 0, 4),
        "empty": _entry("F32", [0, 3], 0, 0),
    }
    head = _head(obj)
    assert set(safetensors.numpy.load(head + bytes(6))) == set(obj)
    layout = parse_header(head, file_size=len(head) + 6)
    assert [t.name for t in layout.tensors] == ["empty", "first", "z", "last"]


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [1], 12, 16)}, "a gap of 4 bytes"),
        ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, "4 bytes inside"),
    ],
    ids=["gap", "overlap"],
)
def test_gaps_and_overlaps_are_refused_naming_the_tensor(obj: object, words: str) -> None:
    head = _head(obj)
    with pytest.raises(ModelFormatError, match=f"tensor 'b': data is not contiguous.*{words}"):
        parse_header(head, file_size=len(head) + 16)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"__metadata__": {"k": 1}}', "'k' is int"),
        ('{"__metadata__": [1]}', "object of strings, got list"),
        (
            '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            '"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            "names 'a' twice",
        ),
    ],
    ids=["metadata-value", "metadata-list", "duplicate"],
)
def test_malformed_metadata_and_a_name_given_twice_are_refused(text: str, words: str) -> None:
    head, _ = _hand_made(text, 0)
    with pytest.raises(ModelFormatError, match=words):
        parse_file_header(head, file_size=None)


def test_null_metadata_reads_as_none() -> None:
    head, size = _hand_made('{"__metadata__": null}', 0)
    assert parse_file_header(head, file_size=size).metadata is None
