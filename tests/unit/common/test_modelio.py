"""Unit tests for common.modelio: chunked model writing/reading and manifests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors.numpy
import xxhash

from common.digest import segment_count, whole_digest
from common.errors import ModelFormatError
from common.modelio import (
    DEFAULT_CHUNK_BYTES,
    ModelReader,
    ModelWriter,
    byte_view,
    compute_manifest,
    hash_file_segments,
    read_layout,
    same_head,
)
from common.tensorfile import Manifest, plan_layout, st_dtype

Arr = npt.NDArray[np.generic]


def _values() -> dict[str, Arr]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal(7),  # float64
        "h": rng.standard_normal(9).astype(np.float16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(2, 2, 2), dtype=np.int32),
        "empty": np.zeros(0, dtype=np.uint8),
        "i16": np.array([-32768, 0, 32767], dtype=np.int16),
        "step": np.array(123456789012, dtype=np.int64),  # 0-d
        "i8": np.array([-128, -1, 0, 127], dtype=np.int8),
        "u8": np.arange(13, dtype=np.uint8),
        "mask": np.array([True, False, True, True, False]),
    }


def _spec(values: dict[str, Arr]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, st_dtype(v.dtype), v.shape) for k, v in values.items()]


def _write(
    path: Path,
    values: dict[str, Arr],
    segment_bytes: int,
    sizes: tuple[int, ...] = (1, 3, 2, 7),
    metadata: dict[str, str] | None = None,
) -> Manifest:
    """Write ``values`` in uneven flat chunks of ``sizes`` elements (cycled)."""
    k = 0
    with ModelWriter(path, _spec(values), segment_bytes=segment_bytes, metadata=metadata) as w:
        for name, arr in values.items():
            flat = arr.reshape(-1)
            pos = 0
            while pos < flat.size:
                n = sizes[k % len(sizes)]
                k += 1
                w.write(flat[pos : pos + n], name=name if k % 2 else None)
                pos += n
        return w.finish()


def _slices(blob: bytes, seg: int) -> list[str]:
    return [xxhash.xxh3_64_hexdigest(blob[i : i + seg]) for i in range(0, max(len(blob), 1), seg)]


# --- writing -------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(1,), (1, 3, 2, 7), (4, 100), (1000,)])
def test_writer_output_loads_with_safetensors(tmp_path: Path, sizes: tuple[int, ...]) -> None:
    values = _values()
    path = tmp_path / "model.safetensors"
    _write(path, values, segment_bytes=64, sizes=sizes)
    loaded = safetensors.numpy.load_file(str(path))
    assert set(loaded) == set(values)
    for name, arr in values.items():
        got = loaded[name]
        assert got.dtype == arr.dtype, name
        assert got.shape == arr.shape, name
        np.testing.assert_array_equal(got, arr)
        assert got.tobytes() == arr.tobytes(), name  # bit-exact (incl. float16)


def test_writer_accepts_multidimensional_chunks(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.float32).reshape(4, 6)
    path = tmp_path / "m.st"
    with ModelWriter(path, [("x", "F32", (4, 6))], segment_bytes=32) as w:
        w.write(arr[:1])  # (1, 6)
        w.write(arr[1:3].reshape(3, 4))  # (3, 4)
        w.write(arr[3:, ::-1][:, ::-1])  # non-contiguous view of the last row
        w.finish()
    np.testing.assert_array_equal(safetensors.numpy.load_file(str(path))["x"], arr)


def test_writer_metadata_reaches_file(tmp_path: Path) -> None:
    values: dict[str, Arr] = {"a": np.ones(3, dtype=np.float32)}
    path = tmp_path / "m.st"
    _write(path, values, segment_bytes=16, metadata={"round": "4"})
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"round": "4"}


def test_writer_accepts_layout(tmp_path: Path) -> None:
    values = _values()
    layout, _ = plan_layout(_spec(values))
    path = tmp_path / "m.st"
    with ModelWriter(path, layout, segment_bytes=100) as w:
        assert w.layout == layout
        for arr in values.values():
            if arr.size:  # a zero-size tensor takes no write
                w.write(arr.reshape(-1))
        w.finish()
    assert read_layout(path) == layout


def test_writer_file_size_and_part_lifecycle(tmp_path: Path) -> None:
    values = _values()
    path = tmp_path / "m.st"
    part = tmp_path / "m.st.part"
    w = ModelWriter(path, _spec(values), segment_bytes=64)
    assert part.exists()
    assert not path.exists()
    assert w.current is not None and w.current.name == "w"
    for arr in values.values():
        if arr.size:
            w.write(arr.reshape(-1))
    assert w.current is None
    manifest = w.finish()
    assert path.exists()
    assert not part.exists()
    assert path.stat().st_size == manifest.file_size == w.layout.file_size
    assert manifest.layout == w.layout


@pytest.mark.parametrize("segment_bytes", [1, 8, 24, 37, 64, 100, 4096])
def test_manifest_matches_compute_manifest(tmp_path: Path, segment_bytes: int) -> None:
    values = _values()
    path = tmp_path / "m.st"
    manifest = _write(path, values, segment_bytes=segment_bytes)
    blob = path.read_bytes()
    assert manifest == compute_manifest(path, segment_bytes)
    assert manifest.segment_bytes == segment_bytes
    assert manifest.num_segments == segment_count(len(blob), segment_bytes)
    assert list(manifest.segment_digests) == _slices(blob, segment_bytes)
    assert manifest.digest == whole_digest(manifest.segment_digests)
    assert manifest.file_size == len(blob)


def test_manifest_segment_sizes_relative_to_file(tmp_path: Path) -> None:
    values = _values()
    path = tmp_path / "m.st"
    _write(path, values, segment_bytes=64)
    size = path.stat().st_size
    header = read_layout(path).data_offset
    assert size % 37 != 0
    # Smaller than the header, not dividing the file, exactly the file, larger than it.
    for seg in (header // 2, 37, size, size + 1, size * 10):
        m = _write(tmp_path / f"m{seg}.st", values, segment_bytes=seg)
        assert m == compute_manifest(tmp_path / f"m{seg}.st", seg)
        assert list(m.segment_digests) == _slices(path.read_bytes(), seg)
    assert compute_manifest(path, size).num_segments == 1
    assert compute_manifest(path, size - 1).num_segments == 2


def test_manifest_of_empty_model(tmp_path: Path) -> None:
    path = tmp_path / "empty.st"
    with ModelWriter(path, [], segment_bytes=8) as w:
        m = w.finish()
    assert m == compute_manifest(path, 8)
    assert m.layout.tensors == ()
    assert safetensors.numpy.load_file(str(path)) == {}


def test_manifest_differs_when_data_differs(tmp_path: Path) -> None:
    values = _values()
    m1 = _write(tmp_path / "a.st", values, segment_bytes=64)
    values["u8"] = values["u8"].copy()
    values["u8"][-1] ^= 1
    m2 = _write(tmp_path / "b.st", values, segment_bytes=64)
    assert m1.layout == m2.layout
    assert m1.digest != m2.digest
    diff = [
        i
        for i, (x, y) in enumerate(zip(m1.segment_digests, m2.segment_digests, strict=True))
        if x != y
    ]
    assert len(diff) == 1


# --- writer errors -------------------------------------------------------------------


def test_writer_rejects_wrong_dtype(tmp_path: Path) -> None:
    path = tmp_path / "m.st"
    with (
        pytest.raises(ModelFormatError, match="chunk has dtype float64") as exc,
        ModelWriter(path, [("a", "F32", (4,))], segment_bytes=8) as w,
    ):
        w.write(np.zeros(2, dtype=np.float64))
    assert "'a'" in str(exc.value)
    assert not (tmp_path / "m.st.part").exists()
    assert not path.exists()


def test_writer_rejects_big_endian(tmp_path: Path) -> None:
    with (
        pytest.raises(ModelFormatError, match="chunk has dtype"),
        ModelWriter(tmp_path / "m.st", [("a", "F32", (4,))], segment_bytes=8) as w,
    ):
        w.write(np.zeros(4, dtype=">f4"))


def test_writer_rejects_too_many_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.st"
    with (
        pytest.raises(ModelFormatError) as exc,
        ModelWriter(path, [("a", "F32", (4,)), ("b", "F32", (1,))], segment_bytes=8) as w,
    ):
        w.write(np.zeros(3, dtype=np.float32))
        w.write(np.zeros(2, dtype=np.float32))  # 20 bytes into a 16-byte tensor
    msg = str(exc.value)
    assert "'a'" in msg
    assert "20 bytes written" in msg
    assert "holds 16" in msg
    assert not (tmp_path / "m.st.part").exists()


def test_writer_rejects_write_after_last_tensor(tmp_path: Path) -> None:
    with (
        pytest.raises(ModelFormatError, match="already written"),
        ModelWriter(tmp_path / "m.st", [("a", "U8", (2,))], segment_bytes=8) as w,
    ):
        w.write(np.zeros(2, dtype=np.uint8))
        w.write(np.zeros(1, dtype=np.uint8))
    assert not (tmp_path / "m.st.part").exists()


def test_writer_rejects_wrong_name(tmp_path: Path) -> None:
    with (
        pytest.raises(ModelFormatError, match="expected data for tensor 'a', got 'b'"),
        ModelWriter(
            tmp_path / "m.st", [("a", "U8", (2,)), ("b", "U8", (2,))], segment_bytes=8
        ) as w,
    ):
        w.write(np.zeros(2, dtype=np.uint8), name="b")


def test_writer_finish_rejects_incomplete_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.st"
    with (
        pytest.raises(ModelFormatError) as exc,
        ModelWriter(path, [("a", "F32", (4,)), ("b", "F32", (2,))], segment_bytes=8) as w,
    ):
        w.write(np.zeros(4, dtype=np.float32))
        w.write(np.zeros(1, dtype=np.float32))
        w.finish()
    assert "tensor 'b' is incomplete: 4 of 8 bytes written" in str(exc.value)
    assert not path.exists()
    assert not (tmp_path / "m.st.part").exists()


def test_writer_abort_removes_part(tmp_path: Path) -> None:
    path = tmp_path / "m.st"
    w = ModelWriter(path, [("a", "F32", (4,))], segment_bytes=8)
    w.write(np.zeros(2, dtype=np.float32))
    assert (tmp_path / "m.st.part").exists()
    w.abort()
    assert not (tmp_path / "m.st.part").exists()
    assert not path.exists()


def test_writer_foreign_exception_inside_with_removes_part(tmp_path: Path) -> None:
    path = tmp_path / "m.st"
    with pytest.raises(KeyError), ModelWriter(path, [("a", "F32", (4,))], segment_bytes=8) as w:
        w.write(np.zeros(2, dtype=np.float32))
        raise KeyError("boom")
    assert not (tmp_path / "m.st.part").exists()
    assert not path.exists()


def test_writer_exception_after_finish_keeps_file(tmp_path: Path) -> None:
    path = tmp_path / "m.st"
    with pytest.raises(RuntimeError), ModelWriter(path, [("a", "U8", (1,))], segment_bytes=8) as w:
        w.write(np.ones(1, dtype=np.uint8))
        w.finish()
        raise RuntimeError("later")
    assert path.exists()
    assert safetensors.numpy.load_file(str(path))["a"].tolist() == [1]


def test_writer_failed_write_leaves_state_unchanged(tmp_path: Path) -> None:
    """A rejected chunk is not written: the writer can go on and produce a valid file."""
    path = tmp_path / "m.st"
    with ModelWriter(path, [("a", "F32", (3,))], segment_bytes=8) as w:
        w.write(np.array([1.0], dtype=np.float32))
        with pytest.raises(ModelFormatError):
            w.write(np.array([2.0, 3.0, 4.0], dtype=np.float32))
        with pytest.raises(ModelFormatError):
            w.write(np.array([2.0], dtype=np.float64))
        w.write(np.array([2.0, 3.0], dtype=np.float32))
        m = w.finish()
    assert safetensors.numpy.load_file(str(path))["a"].tolist() == [1.0, 2.0, 3.0]
    assert m == compute_manifest(path, 8)


def test_writer_zero_size_first_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.st"
    with ModelWriter(path, [("e", "F32", (0,)), ("a", "F32", (2,))], segment_bytes=8) as w:
        assert w.current is not None and w.current.name == "a"
        w.write(np.ones(2, dtype=np.float32), name="a")
        w.finish()
    assert safetensors.numpy.load_file(str(path))["e"].shape == (0,)


def test_writer_only_zero_size_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.st"
    with ModelWriter(path, [("e", "F32", (0,))], segment_bytes=8) as w:
        assert w.current is None
        m = w.finish()
    assert path.exists()
    assert m == compute_manifest(path, 8)
    assert safetensors.numpy.load_file(str(path))["e"].shape == (0,)


def test_writer_skips_runs_of_zero_size_tensors(tmp_path: Path) -> None:
    tensors = [
        ("z0", "F32", (0,)),
        ("z1", "U8", (3, 0)),
        ("a", "U8", (2,)),
        ("z2", "F64", (0,)),
        ("z3", "I8", (0, 0)),
        ("b", "U8", (1,)),
        ("z4", "BOOL", (0,)),
    ]
    path = tmp_path / "m.st"
    with ModelWriter(path, tensors, segment_bytes=8) as w:
        w.write(np.array([1, 2], dtype=np.uint8), name="a")
        assert w.current is not None and w.current.name == "b"
        w.write(np.array([3], dtype=np.uint8), name="b")
        assert w.current is None
        w.finish()
    loaded = safetensors.numpy.load_file(str(path))
    assert loaded["a"].tolist() == [1, 2]
    assert loaded["b"].tolist() == [3]
    assert loaded["z1"].shape == (3, 0)
    assert loaded["z3"].shape == (0, 0)


def test_writer_accepts_empty_chunk(tmp_path: Path) -> None:
    """An empty chunk (e.g. the tail of a split) is a no-op, not an error."""
    path = tmp_path / "m.st"
    with ModelWriter(path, [("a", "F32", (2,))], segment_bytes=8) as w:
        w.write(np.zeros(0, dtype=np.float32))
        w.write(np.ones(2, dtype=np.float32))
        w.finish()
    assert safetensors.numpy.load_file(str(path))["a"].tolist() == [1.0, 1.0]


def test_writer_with_block_without_finish_aborts(tmp_path: Path) -> None:
    path = tmp_path / "m.st"
    with ModelWriter(path, [("a", "F32", (4,))], segment_bytes=8) as w:
        w.write(np.zeros(4, dtype=np.float32))
        assert (tmp_path / "m.st.part").exists()
    assert w.current is None  # complete, yet never finished: nothing is published
    assert not (tmp_path / "m.st.part").exists()
    assert not path.exists()


def test_writer_failed_rename_removes_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    path = tmp_path / "m.st"
    w = ModelWriter(path, [("a", "U8", (1,))], segment_bytes=8)
    w.write(np.ones(1, dtype=np.uint8))
    monkeypatch.setattr("common.modelio.os.replace", fail)
    with pytest.raises(OSError, match="No space"):
        w.finish()
    assert not (tmp_path / "m.st.part").exists()
    assert not path.exists()


@pytest.mark.parametrize("durable", [True, False])
def test_writer_durable_controls_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr("common.modelio.os.fsync", counting_fsync)
    with ModelWriter(tmp_path / "m.st", [("a", "U8", (1,))], segment_bytes=8, durable=durable) as w:
        w.write(np.ones(1, dtype=np.uint8))
        w.finish()
    assert len(synced) == (2 if durable else 0)  # the file, then its directory


def test_writer_durable_and_scratch_files_are_identical(tmp_path: Path) -> None:
    values = _values()
    manifests = []
    for durable in (True, False):
        path = tmp_path / f"m-{durable}.st"
        with ModelWriter(
            path, _spec(values), segment_bytes=24, metadata={"r": "1"}, durable=durable
        ) as w:
            for arr in values.values():
                if arr.size:  # a zero-size tensor takes no write
                    w.write(arr.reshape(-1))
            manifests.append(w.finish())
        assert not (tmp_path / f"m-{durable}.st.part").exists()
    assert manifests[0] == manifests[1]
    assert manifests[0] == compute_manifest(tmp_path / "m-True.st", 24)
    assert (tmp_path / "m-True.st").read_bytes() == (tmp_path / "m-False.st").read_bytes()


# --- byte_view -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "arr",
    [
        np.array(7, dtype=np.int64),
        np.zeros(0, dtype=np.float32),
        np.zeros((2, 0), dtype=np.float64),
        np.array([True, False]),
        np.arange(6, dtype=np.float16).reshape(2, 3),
        np.arange(3, dtype=">i4"),
    ],
    ids=["0-d", "empty", "empty-2d", "bool", "2-d", "big-endian"],
)
def test_byte_view_is_the_array_bytes(arr: Arr) -> None:
    view = byte_view(arr)
    assert view.format == "B"
    assert view.ndim == 1
    assert view.nbytes == arr.nbytes
    assert bytes(view) == arr.tobytes()


def test_byte_view_writes_through() -> None:
    arr = np.zeros(2, dtype=np.uint16)
    byte_view(arr)[:] = b"\x01\x00\x02\x00"
    assert arr.tolist() == [1, 2]


def test_byte_view_of_read_only_array_is_read_only() -> None:
    arr = np.zeros(2, dtype=np.uint8)
    arr.flags.writeable = False
    assert byte_view(arr).readonly


def test_byte_view_rejects_non_contiguous() -> None:
    with pytest.raises(ValueError, match="C-contiguous"):
        byte_view(np.arange(10, dtype=np.int32)[::2])


# --- reading -------------------------------------------------------------------------


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, dict[str, Arr]]:
    values = _values()
    path = tmp_path / "model.safetensors"
    _write(path, values, segment_bytes=64)
    return path, values


def test_read_layout(model: tuple[Path, dict[str, Arr]]) -> None:
    path, values = model
    layout = read_layout(path)
    assert layout == plan_layout(_spec(values))[0]


def test_reader_reads_safetensors_library_file(tmp_path: Path) -> None:
    values: dict[str, npt.NDArray[Any]] = {
        "x": np.arange(10, dtype=np.float64),
        "y": np.arange(6, dtype=np.int32).reshape(2, 3),
    }
    path = tmp_path / "lib.st"
    safetensors.numpy.save_file(values, str(path))
    with ModelReader(path) as r:
        assert sorted(r.names) == ["x", "y"]
        np.testing.assert_array_equal(r.read_tensor("x"), values["x"])
        np.testing.assert_array_equal(r.read_tensor("y"), values["y"])


def test_read_tensor_shape_and_values(model: tuple[Path, dict[str, Arr]]) -> None:
    path, values = model
    with ModelReader(path) as r:
        assert r.names == list(values)
        for name, arr in values.items():
            got = r.read_tensor(name)
            assert got.shape == arr.shape, name
            assert got.dtype == arr.dtype, name
            assert got.tobytes() == arr.tobytes(), name
        with pytest.raises(ModelFormatError, match="no tensor named 'nope'"):
            r.read_tensor("nope")


@pytest.mark.parametrize("max_bytes", [1, 3, 5, 12, 13, 60, 61, 10_000, DEFAULT_CHUNK_BYTES])
def test_iter_chunks_concatenates_exactly(
    model: tuple[Path, dict[str, Arr]], max_bytes: int
) -> None:
    path, values = model
    with ModelReader(path) as r:
        for name, arr in values.items():
            chunks = list(r.iter_chunks(name, max_bytes))
            itemsize = arr.dtype.itemsize
            step = max(1, max_bytes // itemsize)
            assert [c.size for c in chunks] == [
                min(step, arr.size - i) for i in range(0, arr.size, step)
            ], name
            for c in chunks:
                assert c.ndim == 1
                assert c.dtype == arr.dtype
                assert c.nbytes <= max(max_bytes, itemsize)
            flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=arr.dtype)
            assert flat.tobytes() == arr.reshape(-1).tobytes(), name


def test_iter_chunks_known_split(model: tuple[Path, dict[str, Arr]]) -> None:
    path, values = model
    with ModelReader(path) as r:
        chunks = list(r.iter_chunks("w", 16))  # 15 float32 in chunks of 4
    assert [c.size for c in chunks] == [4, 4, 4, 3]
    np.testing.assert_array_equal(chunks[-1], values["w"].reshape(-1)[12:])


def test_iter_chunks_are_independent_arrays(model: tuple[Path, dict[str, Arr]]) -> None:
    path, _ = model
    with ModelReader(path) as r:
        chunks = list(r.iter_chunks("u8", 4))
    chunks[0][:] = 0
    assert chunks[1].tolist() == [4, 5, 6, 7]


def test_read_into_partial(model: tuple[Path, dict[str, Arr]]) -> None:
    path, values = model
    with ModelReader(path) as r:
        spec = r.layout.tensor("b")
        out = np.empty(3, dtype=np.float64)
        r.read_into(spec, 2, out)
    np.testing.assert_array_equal(out, values["b"][2:5])


def test_reader_close_is_idempotent(model: tuple[Path, dict[str, Arr]]) -> None:
    path, _ = model
    r = ModelReader(path)
    r.close()
    r.close()


def test_reader_rejects_truncated_file(model: tuple[Path, dict[str, Arr]]) -> None:
    path, _ = model
    layout = read_layout(path)
    blob = path.read_bytes()
    path.write_bytes(blob[:-3])
    with pytest.raises(ModelFormatError, match="header describes"):
        read_layout(path)
    with ModelReader(path, layout) as r, pytest.raises(ModelFormatError, match="ends inside"):
        r.read_tensor("mask")


def test_read_layout_rejects_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.st"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ModelFormatError, match="shorter than the 8-byte"):
        read_layout(path)


# --- hash_file_segments --------------------------------------------------------------


def test_hash_file_segments_all_and_subset(model: tuple[Path, dict[str, Arr]]) -> None:
    path, _ = model
    blob = path.read_bytes()
    expected = dict(enumerate(_slices(blob, 50)))
    assert hash_file_segments(path, 50) == expected
    last = len(expected) - 1
    subset = hash_file_segments(path, 50, [last, 0, 2])
    assert subset == {last: expected[last], 0: expected[0], 2: expected[2]}
    assert list(subset) == [last, 0, 2]
    assert hash_file_segments(path, 50, []) == {}


def test_hash_file_segments_large_segment_chunked_path(tmp_path: Path) -> None:
    """Segments bigger than the 8 MiB read buffer are hashed in several reads."""
    blob = np.random.default_rng(3).integers(0, 256, DEFAULT_CHUNK_BYTES + 12345, np.uint8)
    data = blob.tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    seg = DEFAULT_CHUNK_BYTES + 1000
    got = hash_file_segments(path, seg)
    assert got == {
        0: xxhash.xxh3_64_hexdigest(data[:seg]),
        1: xxhash.xxh3_64_hexdigest(data[seg:]),
    }
    assert hash_file_segments(path, seg, [1]) == {1: got[1]}


def test_hash_file_segments_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    assert hash_file_segments(path, 16) == {0: xxhash.xxh3_64_hexdigest(b"")}


@pytest.mark.parametrize("offset", [0, 3], ids=["just-past-end", "far-past-end"])
def test_hash_file_segments_rejects_index_past_end(
    model: tuple[Path, dict[str, Arr]], offset: int
) -> None:
    path, _ = model
    count = segment_count(path.stat().st_size, 50)
    with pytest.raises(ValueError) as exc:
        hash_file_segments(path, 50, [0, count + offset])
    msg = str(exc.value)
    assert f"segment index {count + offset} is out of range" in msg
    assert f"has {count} segment(s)" in msg


def test_hash_file_segments_rejects_negative_index(model: tuple[Path, dict[str, Arr]]) -> None:
    path, _ = model
    count = segment_count(path.stat().st_size, 50)
    with pytest.raises(ValueError, match=rf"segment index -1 is out of range.* {count} segment"):
        hash_file_segments(path, 50, [-1])


def test_hash_file_segments_empty_file_has_exactly_one_segment(tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    assert hash_file_segments(path, 16, [0]) == {0: xxhash.xxh3_64_hexdigest(b"")}
    with pytest.raises(ValueError, match="segment index 1"):
        hash_file_segments(path, 16, [1])


def _plus_one_over(src: Path, dest: Path, segment_bytes: int, *, tail: bytes = b"") -> Manifest:
    """Write ``src``'s tensors + 1 over ``src`` itself, reading each chunk just before
    writing it back, the way an in-place trainer must."""
    layout = read_layout(src)
    with open(src, "ab") as f:
        f.write(tail)
    with (
        ModelReader(src, layout) as reader,
        ModelWriter(dest, layout, segment_bytes=segment_bytes, over=src) as w,
    ):
        assert not src.exists()
        for spec in layout.tensors:
            for first in range(0, spec.numel, 2):
                chunk = np.empty(min(2, spec.numel - first), dtype=spec.np_dtype)
                reader.read_into(spec, first, chunk)
                w.write(chunk + chunk.dtype.type(1))
        return w.finish()


@pytest.mark.parametrize("tail", [b"", b"trailing bytes"], ids=["same size", "longer"])
def test_writing_over_a_file_gives_the_bytes_of_a_new_one(tmp_path: Path, tail: bytes) -> None:
    values = {k: v for k, v in _values().items() if v.dtype.kind == "f"}
    _write(tmp_path / "model.st", values, segment_bytes=16)
    fresh = _write(tmp_path / "fresh.st", {k: v + 1 for k, v in values.items()}, segment_bytes=16)
    assert same_head(tmp_path / "model.st", fresh.layout)

    man = _plus_one_over(tmp_path / "model.st", tmp_path / "update.st", 16, tail=tail)
    assert man == fresh
    assert (tmp_path / "update.st").read_bytes() == (tmp_path / "fresh.st").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.st", "update.st"]


def test_writing_over_a_file_that_fails_leaves_neither_file(tmp_path: Path) -> None:
    _write(tmp_path / "model.st", {"a": np.arange(4, dtype=np.float32)}, segment_bytes=8)
    layout = read_layout(tmp_path / "model.st")
    with (
        pytest.raises(KeyError),
        ModelWriter(tmp_path / "u.st", layout, segment_bytes=8, over=tmp_path / "model.st") as w,
    ):
        w.write(np.zeros(2, dtype=np.float32))
        raise KeyError("the trainer failed")
    assert list(tmp_path.iterdir()) == []


def test_same_head_is_false_for_another_layout_or_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.st"
    _write(path, {"a": np.zeros(4, dtype=np.float32)}, segment_bytes=8, metadata={"r": "1"})
    layout = read_layout(path)
    assert same_head(path, layout, {"r": "1"})
    assert not same_head(path, layout)
    other, _ = plan_layout([("a", "F32", (2, 2))])
    assert not same_head(path, other, {"r": "1"})
