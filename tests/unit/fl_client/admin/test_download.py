"""``fl-admin download``: what it checks, what it keeps for a resume, what it leaves."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from common import wire
from common.config import TransferSettings
from common.errors import IntegrityError, NotFound, ProtocolError
from common.tensorfile import Manifest
from fl_client.admin import download
from fl_client.admin.download_view import PlainView
from tests.fakeserver import Handler, file_ranges, job_status, make_model, serve

JOB_ID = "job1"
SEGMENT_BYTES = 8192
SETTINGS = TransferSettings(window=2, max_segment_attempts=3)


# -- the pure parts -------------------------------------------------------------------------


def test_the_whole_digest_must_be_made_of_the_segment_digests(tmp_path: Path) -> None:
    man = make_model(tmp_path / "m.st")
    download.check_whole(man, "model of job j round 2")
    bad = man.model_copy(update={"digest": "0" * 32})
    with pytest.raises(IntegrityError, match=r"model of job j round 2: .* manifest says 0{32}"):
        download.check_whole(bad, "model of job j round 2")
    short = man.model_copy(update={"segment_digests": man.segment_digests[:-1]})
    with pytest.raises(
        ProtocolError, match="lists 4 segment digests for the 5 segments of its file"
    ):
        download.check_whole(short, "m")


def test_the_work_folder_is_hidden_beside_the_output(tmp_path: Path) -> None:
    assert download.work_dir(tmp_path / "out.st") == tmp_path / ".out.st.fl-download"


def test_only_the_files_of_this_model_are_kept_in_the_work_folder(tmp_path: Path) -> None:
    work = tmp_path / ".o.fl-download"
    work.mkdir()
    for name in ("abc.safetensors.part", "abc.safetensors.segments", "old.safetensors.part"):
        (work / name).write_bytes(b"x")
    download.drop_others(work, "abc")
    assert sorted(p.name for p in work.iterdir()) == [
        "abc.safetensors.part",
        "abc.safetensors.segments",
    ]
    download.drop_others(tmp_path / ".new.fl-download", "abc")  # created when absent
    assert (tmp_path / ".new.fl-download").is_dir()


def test_a_single_file_model_becomes_the_output_and_the_folder_goes(tmp_path: Path) -> None:
    work = tmp_path / ".out.st.fl-download"
    work.mkdir()
    (work / "d.safetensors").write_bytes(b"model")
    out = tmp_path / "out.st"
    out.write_bytes(b"an older download")  # replaced, as before
    written = download.place(work / "d.safetensors", out, None)
    assert written == [download.Written(out, 5)]
    assert out.read_bytes() == b"model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.st"]


def test_a_sharded_model_is_written_into_the_output_folder(tmp_path: Path) -> None:
    work = tmp_path / ".ckpt.fl-download"
    work.mkdir()
    model = work / "d.safetensors"
    model.write_bytes(b"0123456789")
    out = tmp_path / "ckpt"

    def shard(whole: Path) -> list[Path]:
        data = whole.read_bytes()
        paths = [out / "model-00001-of-00002.safetensors", out / "model-00002-of-00002.safetensors"]
        paths[0].write_bytes(data[:4])
        paths[1].write_bytes(data[4:])
        return paths

    written = download.place(model, out, shard)
    assert [(w.path.name, w.nbytes) for w in written] == [
        ("model-00001-of-00002.safetensors", 4),
        ("model-00002-of-00002.safetensors", 6),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_no_layout_means_one_file(tmp_path: Path) -> None:
    assert download.sharder(None, tmp_path) is None


def test_plain_progress_says_what_starts_what_resumed_and_what_was_fetched() -> None:
    out = io.StringIO()
    view = PlainView(out)
    view.start("model of job j round 1", 4096)
    view.add(1024)  # what an earlier run left
    view.add(2048)
    view.add(1024)
    view.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "downloading model of job j round 1: 4.0 KiB, 1.0 KiB already on disk (verified), resuming",
        lines[1],
    ]
    assert lines[1].startswith("downloaded model of job j round 1: 3.0 KiB fetched in ")


def test_plain_progress_of_a_failed_download_has_no_end_line() -> None:
    out = io.StringIO()
    view = PlainView(out)
    view.start("m", 4096)
    view.add(0)
    view.close()
    assert out.getvalue() == "downloading m: 4.0 KiB\n"


# -- against a server --------------------------------------------------------------------


class Counting:
    """Range requests of the model route, the first ``corrupt`` of them with a flipped byte."""

    def __init__(self, model: Path, corrupt: int = 0) -> None:
        self.ranges = file_ranges(model)
        self.corrupt = corrupt
        self.requests: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.headers["Range"])
        nth = len(self.requests)  # before the wait: other requests arrive meanwhile
        resp = await self.ranges(request)
        assert isinstance(resp, web.Response) and isinstance(resp.body, bytes)
        if nth <= self.corrupt:
            body = bytearray(resp.body)
            body[10] ^= 0xFF
            resp.body = bytes(body)
        return resp


def _routes(
    man: Manifest, model: Handler, checkpoint: Handler | None = None
) -> dict[tuple[str, str], Handler]:
    async def manifest(request: web.Request) -> web.StreamResponse:
        assert request.query["round"] == "2"  # the latest, fixed before anything is fetched
        return web.json_response(text=man.model_dump_json())

    routes = {
        ("GET", wire.JOB.format(job_id=JOB_ID)): job_status(
            JOB_ID, state=wire.JobState.RUNNING, round=2, num_rounds=3, model_bytes=man.file_size
        ),
        ("GET", wire.JOB_MANIFEST.format(job_id=JOB_ID)): manifest,
        ("GET", wire.JOB_MODEL.format(job_id=JOB_ID)): model,
    }
    if checkpoint is not None:
        routes["GET", download.JOB_CHECKPOINT.format(job_id=JOB_ID)] = checkpoint
    return routes


async def _download(routes: dict[tuple[str, str], Handler], out: Path) -> list[download.Written]:
    view = PlainView(io.StringIO())
    async with serve(routes) as a:
        return await download.download(a, JOB_ID, out, round=None, view=view, settings=SETTINGS)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_a_download_equals_the_model_and_leaves_no_temporaries(tmp_path: Path) -> None:
    model = tmp_path / "server.st"
    man = make_model(model, segment_bytes=SEGMENT_BYTES)
    handler = Counting(model)
    out = tmp_path / "out.st"
    written = await _download(_routes(man, handler.handle), out)
    assert written == [download.Written(out, man.file_size)]
    assert await asyncio.to_thread(out.read_bytes) == await asyncio.to_thread(model.read_bytes)
    assert len(handler.requests) == man.num_segments
    assert await asyncio.to_thread(_listing, tmp_path) == ["out.st", "server.st"]


async def test_a_corrupted_segment_is_fetched_again(tmp_path: Path) -> None:
    model = tmp_path / "server.st"
    man = make_model(model, segment_bytes=SEGMENT_BYTES)
    handler = Counting(model, corrupt=1)
    out = tmp_path / "out.st"
    await _download(_routes(man, handler.handle), out)
    assert await asyncio.to_thread(out.read_bytes) == await asyncio.to_thread(model.read_bytes)
    assert len(handler.requests) == man.num_segments + 1


async def test_segments_corrupted_every_time_fail_naming_the_job_and_round(
    tmp_path: Path,
) -> None:
    model = tmp_path / "server.st"
    man = make_model(model, segment_bytes=SEGMENT_BYTES)
    out = tmp_path / "out.st"
    with pytest.raises(IntegrityError, match=f"model of job {JOB_ID} round 2: .*gave up after 3"):
        await _download(_routes(man, Counting(model, corrupt=10**6).handle), out)
    assert not await asyncio.to_thread(out.exists)


async def test_a_manifest_that_disagrees_with_itself_fetches_nothing(tmp_path: Path) -> None:
    model = tmp_path / "server.st"
    man = make_model(model, segment_bytes=SEGMENT_BYTES)
    handler = Counting(model)
    bad = man.model_copy(update={"digest": "f" * 32})
    with pytest.raises(IntegrityError, match=f"model of job {JOB_ID} round 2: the segments make"):
        await _download(_routes(bad, handler.handle), tmp_path / "out.st")
    assert handler.requests == []


async def test_a_second_run_fetches_only_what_the_first_did_not_verify(tmp_path: Path) -> None:
    model = tmp_path / "server.st"
    man = make_model(model, segment_bytes=SEGMENT_BYTES)
    out = tmp_path / "out.st"
    # the first run fails for good on segment 3; what it verified before stays on disk
    failing = Counting(model)

    async def breaks_on_3(request: web.Request) -> web.StreamResponse:
        if request.headers["Range"].startswith(f"bytes={3 * SEGMENT_BYTES}-"):
            raise web.HTTPNotFound(text='{"code": "not_found", "message": "gone for now"}')
        return await failing.handle(request)

    with pytest.raises(NotFound):
        await _download(_routes(man, breaks_on_3), out)
    work = download.work_dir(out)
    assert (work / f"{man.digest}.safetensors.part").exists()
    second = Counting(model)
    await _download(_routes(man, second.handle), out)
    assert len(failing.requests) + len(second.requests) <= man.num_segments + SETTINGS.window
    assert f"bytes={3 * SEGMENT_BYTES}-{4 * SEGMENT_BYTES - 1}" in second.requests
    assert await asyncio.to_thread(out.read_bytes) == await asyncio.to_thread(model.read_bytes)
    assert not await asyncio.to_thread(work.exists)


async def test_a_sharded_checkpoint_is_written_into_the_output_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "server.st"
    man = make_model(model, segment_bytes=SEGMENT_BYTES)
    out = tmp_path / "ckpt"
    seen: list[Any] = []

    class Sharded:
        is_sharded = True

    def write(whole: Path, layout: Any, into: Path, chunk_bytes: int) -> list[Path]:
        seen.append((whole.read_bytes(), layout, into))
        shard = into / "model-00001-of-00001.safetensors"
        shard.write_bytes(b"s")
        return [shard]

    async def layout(a: Any, job_id: str) -> Sharded:
        return Sharded()

    monkeypatch.setattr(download, "checkpoint_layout", layout)
    monkeypatch.setattr(download, "write_checkpoint", write)
    written = await _download(_routes(man, Counting(model).handle), out)
    assert written == [download.Written(out / "model-00001-of-00001.safetensors", 1)]
    ((whole, got_layout, into),) = seen
    assert whole == model.read_bytes() and isinstance(got_layout, Sharded) and into == out
    assert await asyncio.to_thread(_listing, tmp_path) == ["ckpt", "server.st"]


async def test_a_job_without_a_checkpoint_layout_gets_one_file(tmp_path: Path) -> None:
    model = tmp_path / "server.st"
    man = make_model(model, segment_bytes=SEGMENT_BYTES)

    async def none(request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound(text='{"code": "not_found", "message": "no layout"}')

    out = tmp_path / "out.st"
    await _download(_routes(man, Counting(model).handle, checkpoint=none), out)
    assert await asyncio.to_thread(out.read_bytes) == await asyncio.to_thread(model.read_bytes)
