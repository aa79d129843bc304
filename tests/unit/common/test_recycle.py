"""The pool of spare files: what it hands out, what it never does, and writers over it."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
from aiohttp import web

from common.config import TransferSettings
from common.modelio import ModelWriter
from common.recycle import FilePool
from fl_client.site.transfer import TransferContext, Verified, download_model
from tests.fakeserver import file_ranges, make_model, serve


def _spare(pool: FilePool, tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    pool.retire(path)
    assert not path.exists()


def test_a_retired_file_comes_back_sized_under_the_new_name(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "spare", max_files=2)
    _spare(pool, tmp_path, "old", b"x" * 100)
    dest = tmp_path / "new"
    assert pool.take(dest, 60)
    assert dest.read_bytes() == b"x" * 60  # stale bytes: the taker overwrites them
    assert pool.spares() == []
    assert not pool.take(tmp_path / "other", 60)  # nothing left


def test_the_spare_nearest_above_the_size_is_taken_else_the_largest(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "spare", max_files=3)
    for name, size in (("a", 10), ("b", 50), ("c", 30)):
        _spare(pool, tmp_path, name, name.encode() * size)
    first = tmp_path / "first"
    assert pool.take(first, 25)
    assert first.read_bytes() == b"c" * 25
    second = tmp_path / "second"
    assert pool.take(second, 80)  # none is that long: the largest, grown with a hole
    assert second.read_bytes() == b"b" * 50 + b"\0" * 30


def test_take_never_replaces_an_existing_file(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "spare", max_files=1)
    _spare(pool, tmp_path, "old", b"s" * 10)
    dest = tmp_path / "dest"
    dest.write_bytes(b"written by someone else")
    assert not pool.take(dest, 10)
    assert dest.read_bytes() == b"written by someone else"
    assert len(pool.spares()) == 1  # still there for the next taker


def test_beyond_max_files_the_oldest_spares_go(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "spare", max_files=2)
    for name in ("a", "b", "c"):
        _spare(pool, tmp_path, name, name.encode())
    assert sorted(p.read_bytes() for p in pool.spares()) == [b"b", b"c"]
    pool.trim(1)
    assert [p.read_bytes() for p in pool.spares()] == [b"c"]
    pool.clear()
    assert pool.spares() == []


def test_a_pool_of_no_files_deletes_and_hands_out_nothing(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "spare", max_files=0)
    path = tmp_path / "f"
    path.write_bytes(b"data")
    pool.retire(path)
    assert not path.exists()
    assert not (tmp_path / "spare").exists()
    assert not pool.take(tmp_path / "g", 4)
    pool.retire(tmp_path / "missing")  # no error


def test_concurrent_takers_never_share_a_spare(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "spare", max_files=8)
    for i in range(8):
        _spare(pool, tmp_path, f"s{i}", b"z" * 16)
    got: list[Path] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def taker(i: int) -> None:
        dest = tmp_path / f"dest{i}"
        start.wait()
        if pool.take(dest, 16):
            with lock:
                got.append(dest)

    threads = [threading.Thread(target=taker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8
    inodes = {os.stat(p).st_ino for p in got}
    assert len(inodes) == 8
    assert all(os.stat(p).st_nlink == 1 for p in got)


def test_a_writer_over_a_spare_leaves_exactly_what_a_new_file_holds(tmp_path: Path) -> None:
    tensors = [("a", "F32", (1000,)), ("b", "I64", (7, 3))]
    values: dict[str, npt.NDArray[np.generic]] = {
        "a": np.linspace(0, 1, 1000, dtype=np.float32),
        "b": np.arange(21).reshape(7, 3),
    }

    def write(path: Path, pool: FilePool | None) -> bytes:
        with ModelWriter(path, tensors, segment_bytes=512, pool=pool) as w:
            for name, _, _ in tensors:
                w.write(values[name], name=name)
            w.finish()
        return path.read_bytes()

    fresh = write(tmp_path / "fresh.safetensors", None)
    pool = FilePool(tmp_path / "spare", max_files=2)
    _spare(pool, tmp_path, "longer", b"\xff" * (len(fresh) + 4096))  # stale, and longer
    reused = write(tmp_path / "reused.safetensors", pool)
    assert pool.spares() == []  # it was taken
    assert reused == fresh


async def test_a_download_into_a_spare_trusts_none_of_its_stale_bytes(tmp_path: Path) -> None:
    source = tmp_path / "global.safetensors"
    man = make_model(source, elements=20_000, segment_bytes=8192)
    dest = tmp_path / "site" / "model.safetensors"
    dest.parent.mkdir()
    # a spare holding this very model but for one segment, and a journal claiming all of
    # it from an earlier download: the journal must not vouch for the spare's bytes
    stale = bytearray(source.read_bytes())
    stale[8192 * 2 + 10] ^= 0xFF
    pool = FilePool(tmp_path / "spare", max_files=1)
    _spare(pool, tmp_path, "stale", bytes(stale))
    journal = dest.with_name(dest.name + ".segments")
    journal.write_text("".join(f"{i} {d}\n" for i, d in enumerate(man.segment_digests)))
    fetched: list[str] = []
    serve_range = file_ranges(source)

    async def model(request: web.Request) -> web.StreamResponse:
        fetched.append(request.headers["Range"])
        return await serve_range(request)

    settings = TransferSettings(window=2, max_segment_attempts=1)
    async with serve({("GET", "/model"): model}) as api:
        ctx = TransferContext(api, settings, lambda _: None, asyncio.Event(), None, pool)
        await download_model(ctx, "/model", man, dest, Verified())
    assert len(fetched) == man.num_segments  # every segment fetched: none trusted
    assert dest.read_bytes() == source.read_bytes()
    assert pool.spares() == []
