"""``fl-admin download`` keeps a file only if it is the job's whole model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from common import wire
from common.errors import ModelFormatError
from fl_client.admin import api
from tests.fakeserver import Handler, job_status, make_model, serve

JOB_ID = "job1"


def _server(
    model: Path, *, body: bytes | None = None, model_bytes: int | None = None
) -> dict[tuple[str, str], Handler]:
    """The two admin routes the download uses; ``body`` replaces the model's bytes."""
    size = model.stat().st_size

    async def model_file(request: web.Request) -> web.StreamResponse:
        data = body if body is not None else await asyncio.to_thread(model.read_bytes)
        return web.Response(body=data)

    return {
        ("GET", wire.JOB.format(job_id=JOB_ID)): job_status(
            JOB_ID,
            state=wire.JobState.FINISHED,
            round=1,
            num_rounds=1,
            model_bytes=size if model_bytes is None else model_bytes,
        ),
        ("GET", wire.JOB_MODEL.format(job_id=JOB_ID)): model_file,
    }


def _cut_tail(data: bytes) -> bytes:
    return data[:-100]  # the body ends early, with a length that says so (no HTTP error)


def _garbled_header(data: bytes) -> bytes:
    return data[:8] + b"#" + data[9:]


def _endless(data: bytes) -> bytes:
    return data + b"\0" * (64 * 1024 * 1024)  # stopped at the job's model size


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_cut_tail, "but its header describes"),
        (_garbled_header, "header"),
        (_endless, "the server sent more than the \\d+ bytes of the job's model"),
    ],
)
async def test_a_broken_model_is_refused_and_nothing_is_left(
    tmp_path: Path, change: Callable[[bytes], bytes], words: str
) -> None:
    model = tmp_path / "global.safetensors"
    make_model(model)
    body = change(model.read_bytes())
    dest = tmp_path / "out.safetensors"
    async with serve(_server(model, body=body)) as a:
        with pytest.raises(ModelFormatError, match=words):
            await api.download_model(a, JOB_ID, dest, round=None)
    left = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.iterdir()))
    assert left == ["global.safetensors"]


async def test_only_a_model_of_the_jobs_size_is_kept(tmp_path: Path) -> None:
    model = tmp_path / "global.safetensors"
    man = make_model(model)
    dest = tmp_path / "out.safetensors"
    async with serve(_server(model, model_bytes=man.file_size + 4)) as a:
        with pytest.raises(ModelFormatError, match=f"the job's model has {man.file_size + 4}"):
            await api.download_model(a, JOB_ID, dest, round=None)
    assert not await asyncio.to_thread(dest.exists)
    async with serve(_server(model)) as a:
        written = await api.download_model(a, JOB_ID, dest, round=None)
    assert written == man.file_size
    assert await asyncio.to_thread(dest.read_bytes) == await asyncio.to_thread(model.read_bytes)
