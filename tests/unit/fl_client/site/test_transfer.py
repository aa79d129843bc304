"""The client's HTTP edge and segment transfers against a stand-in server in this process."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from common.config import MIB, TransferSettings
from common.errors import IntegrityError, ProtocolError, StorageError
from common.http_client import JSON_REPLY_MAX_BYTES, Api
from common.modelio import hash_file_segments as real_hash
from common.wire import UPLOAD_SEGMENT, UPLOAD_STATUS, HeartbeatReply, UploadStatus
from fl_client.site import download
from fl_client.site.transfer import (
    ACK_MAX_BYTES,
    TransferContext,
    Verified,
    download_model,
    upload_update,
)
from tests.fakeserver import Handler, file_ranges, make_model, serve

ONE_TRY = TransferSettings(window=1, max_segment_attempts=1)


def _ignore(_: int) -> None:
    pass


def _context(api: Api, settings: TransferSettings) -> TransferContext:
    return TransferContext(api, settings, _ignore, asyncio.Event())


async def _endless_json(request: web.Request) -> web.StreamResponse:
    """A reply with no length that goes on past the client's bound (and would for ever)."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
        for _ in range(JSON_REPLY_MAX_BYTES // MIB + 4):
            await resp.write(b" " * MIB)
    return resp


async def _declared_too_long(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b" " * (JSON_REPLY_MAX_BYTES + 1))


@pytest.mark.parametrize("handler", [_endless_json, _declared_too_long])
async def test_json_reply_longer_than_the_bound_is_refused(handler: Handler) -> None:
    async with serve({("GET", "/v1/health"): handler}) as api:
        with pytest.raises(ProtocolError, match=rf"more than the {JSON_REPLY_MAX_BYTES} bytes"):
            await api.call("GET", "/v1/health", HeartbeatReply)


@pytest.mark.parametrize(
    "ack",
    [
        b'{"index": 0, "start": 0}',  # fields missing
        b"<html>502 Bad Gateway</html>",  # not JSON (a 200 from something in between)
        b"[" * (ACK_MAX_BYTES + 1),  # longer than any acknowledgement
    ],
)
async def test_malformed_or_oversized_ack_is_a_protocol_error(tmp_path: Path, ack: bytes) -> None:
    update = tmp_path / "update.safetensors"
    man = make_model(update)
    status = UploadStatus(
        task_id="t1",
        file_size=man.file_size,
        segment_bytes=man.segment_bytes,
        num_segments=man.num_segments,
        segments_done=list(range(1, man.num_segments)),  # only segment 0 to send
    )

    async def upload_status(request: web.Request) -> web.StreamResponse:
        return web.json_response(text=status.model_dump_json())

    async def segment(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=ack, content_type="application/json")

    routes: dict[tuple[str, str], Handler] = {
        ("GET", UPLOAD_STATUS): upload_status,
        ("PUT", UPLOAD_SEGMENT): segment,
    }
    async with serve(routes) as api:
        with pytest.raises(ProtocolError, match="upload of segment 0 of task t1"):
            await upload_update(_context(api, ONE_TRY), "t1", update, man)


async def test_full_disk_during_a_download_is_a_storage_error_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "global.safetensors"
    man = make_model(source)
    fetched: list[str] = []
    serve_range = file_ranges(source)

    async def model(request: web.Request) -> web.StreamResponse:
        fetched.append(request.headers["Range"])
        return await serve_range(request)

    def disk_full(fd: int, buffers: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", disk_full)
    dest = tmp_path / "site" / "model.safetensors"
    settings = TransferSettings(window=1, max_segment_attempts=5)
    async with serve({("GET", "/model"): model}) as api:
        with pytest.raises(StorageError) as err:
            await download_model(_context(api, settings), "/model", man, dest)
    assert err.value.message == (f"download {dest}.part: cannot write: No space left on device")
    assert len(fetched) == 1  # one try: a full disk is not cured by fetching again


async def test_a_retry_in_the_same_process_trusts_the_segments_it_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "global.safetensors"
    man = make_model(source, elements=20_000, segment_bytes=8192)
    assert man.num_segments >= 6
    bad_range = "bytes=16384-24575"  # segment 2, garbled the first time it is asked for
    fetched: list[str] = []
    serve_range = file_ranges(source)

    async def model(request: web.Request) -> web.StreamResponse:
        wanted = request.headers["Range"]
        fetched.append(wanted)
        if wanted == bad_range and fetched.count(wanted) == 1:
            return web.Response(status=206, body=b"\0" * 8192)
        return await serve_range(request)

    hashed: list[list[int]] = []

    def counting_hash(path: Path, segment_bytes: int, indices: list[int]) -> dict[int, str]:
        hashed.append(list(indices))
        return real_hash(path, segment_bytes, indices)

    monkeypatch.setattr(download, "hash_file_segments", counting_hash)
    dest = tmp_path / "site" / "model.safetensors"
    settings = TransferSettings(window=1, max_segment_attempts=1)
    verified = Verified()
    async with serve({("GET", "/model"): model}) as api:

        async def attempt(known: Verified) -> None:
            await download_model(_context(api, settings), "/model", man, dest, verified=known)

        with pytest.raises(IntegrityError):
            await attempt(verified)
        assert verified.segments == {0, 1}
        with pytest.raises(IntegrityError):  # segment 2 garbled again, for the test's sake
            fetched.clear()
            await attempt(verified)
        assert hashed == []  # nothing read back: both passes trusted what they verified
        assert fetched == [bad_range]

        # a new process (a fresh Verified) checks the journal's segments on disk, once
        await attempt(Verified())
    assert hashed == [[0, 1]]
    assert await asyncio.to_thread(dest.read_bytes) == await asyncio.to_thread(source.read_bytes)
