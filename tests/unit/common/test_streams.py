"""Receiving a segment to disk: many small network chunks, and a disk that refuses; a
body's pieces taken as aiohttp received them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import xxhash
from aiohttp.base_protocol import BaseProtocol

from common.errors import StorageError
from common.streams import body_pieces, receive_segment
from common.timeouts import ProgressTimer, Stage


async def _chunks(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for p in pieces:
        yield p


async def _receive(pieces: list[bytes], fd: int, start: int, path: Path | None = None) -> str:
    length = sum(map(len, pieces))
    timer = ProgressTimer(10.0, stage=Stage.RECEIVING, peer="test", what="segment")
    async with timer:
        return await receive_segment(
            _chunks(pieces),
            fd,
            start,
            length,
            timer=timer,
            read_timeout_s=10.0,
            batch_bytes=1 << 30,  # one batch: every chunk goes to one write
            path=path,
        )


async def test_a_batch_of_more_chunks_than_one_write_takes_is_written_whole(
    tmp_path: Path,
) -> None:
    # a slow link hands over small pieces: far more than pwritev takes in one call
    # (IOV_MAX, 1024 on Linux)
    pieces = [bytes([i % 251]) * (1 + i % 7) for i in range(4000)]
    data = b"".join(pieces)
    path = tmp_path / "spool"
    path.write_bytes(b"\0" * (len(data) + 100))
    fd = os.open(path, os.O_RDWR)
    try:
        digest = await _receive(pieces, fd, 100)
    finally:
        os.close(fd)
    assert path.read_bytes()[100:] == data
    assert digest == xxhash.xxh3_64(data).hexdigest()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
async def test_a_disk_that_refuses_is_a_storage_error_naming_the_file() -> None:
    path = Path("/dev/full")  # every write: ENOSPC
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(
            StorageError, match=r"segment file /dev/full: cannot write: No space left"
        ) as err:
            await _receive([b"x" * 1000] * 3, fd, 0, path)
    finally:
        os.close(fd)
    assert err.value.http_status == 507


def _stream() -> aiohttp.StreamReader:
    loop = asyncio.get_running_loop()
    return aiohttp.StreamReader(BaseProtocol(loop), 1 << 20, loop=loop)


async def _collect(stream: aiohttp.StreamReader) -> list[bytes]:
    return [piece async for piece in body_pieces(stream)]


async def test_body_pieces_hands_over_the_received_pieces_as_they_are() -> None:
    # pieces buffered before the reader comes: iter_any would join them into a copy
    stream = _stream()
    pieces = [bytes([i]) * (1000 + i) for i in range(5)]
    for p in pieces:
        stream.feed_data(p)
    stream.feed_eof()
    got = await _collect(stream)
    assert got == pieces
    assert all(g is p for g, p in zip(got, pieces, strict=True))


async def test_body_pieces_reads_a_chunked_body_to_its_end() -> None:
    stream = _stream()
    for data in (b"abc", b"", b"defgh"):  # an empty HTTP chunk is no end of the body
        stream.begin_http_chunk_receiving()
        stream.feed_data(data)
        stream.end_http_chunk_receiving()
    stream.feed_eof()
    assert b"".join(await _collect(stream)) == b"abcdefgh"
