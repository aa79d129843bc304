"""Typed admin calls against the server, shared by ``fl-admin`` and ``fl-poc``.

Small replies go through ``Api.call``; list replies use ``RootModel`` wrappers so they
validate the same way. ``download_model`` is ``fl-poc``'s fetch of the models it checks
with numpy, over a loopback it started itself: one plain GET, no resume (``fl-admin
download`` resumes and checks digests: ``fl_client.admin.download``). It streams the
body to ``FILE.part`` in batches written from a thread, so memory stays at
one batch whatever the model size, and only a checked file is renamed into place. The
check reads the file's safetensors header (and nothing else): it must parse and
describe exactly the bytes received, which must be the job's model size as the server
reports it. It reads no manifest, so a byte changed inside the tensor data would go
unnoticed here (fl-poc compares the tensors with numpy afterwards).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import RootModel

from common import wire
from common.config import JobConfig
from common.errors import ModelFormatError, ProtocolError, StorageError, TransferError
from common.http_client import Api, map_transport_errors, raise_for_error
from common.modelio import read_layout
from common.streams import body_pieces
from common.timeouts import ProgressTimer, Stage
from fl_client.admin.progress import TERMINAL

BATCH_BYTES = 4 * 1024 * 1024
POLL_S = 0.5

T = TypeVar("T")


class JobList(RootModel[list[wire.JobInfo]]):
    pass


class ClientList(RootModel[list[wire.ClientInfo]]):
    pass


def _job_path(route: str, job_id: str) -> str:
    # The id comes from the command line: quote it so it cannot change the route.
    return route.format(job_id=quote(job_id, safe=""))


def _required(reply: T | None, what: str) -> T:
    if reply is None:
        raise ProtocolError(f"{what}: the server sent no answer")
    return reply


async def submit(api: Api, config: JobConfig) -> wire.JobSubmitted:
    reply = await api.call("POST", wire.JOBS, wire.JobSubmitted, body=wire.SubmitJob(config=config))
    return _required(reply, "submit")


async def list_jobs(api: Api) -> JobList:
    return _required(await api.call("GET", wire.JOBS, JobList), "list jobs")


async def job_status(api: Api, job_id: str) -> wire.JobStatus:
    reply = await api.call("GET", _job_path(wire.JOB, job_id), wire.JobStatus)
    return _required(reply, "job status")


async def abort(api: Api, job_id: str) -> wire.JobInfo:
    reply = await api.call("POST", _job_path(wire.JOB_ABORT, job_id), wire.JobInfo)
    return _required(reply, "abort")


async def delete(api: Api, job_id: str) -> wire.JobDeleted:
    reply = await api.call("DELETE", _job_path(wire.JOB, job_id), wire.JobDeleted)
    return _required(reply, "delete")


async def list_clients(api: Api) -> ClientList:
    return _required(await api.call("GET", wire.CLIENTS, ClientList), "list clients")


async def wait_for_job(
    api: Api,
    job_id: str,
    on_status: Callable[[wire.JobStatus], None],
    *,
    poll_s: float = POLL_S,
) -> wire.JobStatus:
    """Poll until the job ends; the caller bounds the wait with ``asyncio.timeout``.

    Polling because the API has no push channel for job events; ``on_status`` sees
    every reply, so callers can report progress as it happens.
    """
    while True:
        status = await job_status(api, job_id)
        on_status(status)
        if status.job.state in TERMINAL:
            return status
        await asyncio.sleep(poll_s)


class RoundProgress:
    """Prints ``round k/N`` once per change of the completed-round count."""

    def __init__(self, prefix: str = "") -> None:
        self._prefix = prefix
        self._last: int | None = None

    def __call__(self, status: wire.JobStatus) -> None:
        job = status.job
        if job.round != self._last:
            self._last = job.round
            print(f"{self._prefix}round {job.round}/{job.num_rounds}", flush=True)


async def download_model(api: Api, job_id: str, dest: Path, *, round: int | None) -> int:
    """Stream the job's model (the latest, or the one after ``round``) to ``dest``.

    Returns the bytes written. On any failure or cancellation the partial file is removed.
    """
    path = _job_path(wire.JOB_MODEL, job_id)
    params = {"round": str(round)} if round is not None else None
    part = dest.with_name(dest.name + ".part")
    what = f"GET {path}"
    timeout = api.timeouts.communication_timeout
    model_bytes = (await job_status(api, job_id)).job.model_bytes  # 0: not known yet
    file = await asyncio.to_thread(_open_part, part)
    try:
        with map_transport_errors(api.base_url, f"{what} from {api.base_url}"):
            async with (
                ProgressTimer(timeout, stage=Stage.WAITING, peer=api.base_url, what=what) as t,
                api.session.get(api.url(path), params=params) as resp,
            ):
                t.enter(Stage.RECEIVING, timeout)
                await raise_for_error(resp)
                written = await _stream_body(resp, file, part, t, model_bytes or None, what)
                expected = resp.content_length
        if expected is not None and written != expected:
            raise TransferError(f"{what}: body ended after {written} of {expected} bytes")
        await asyncio.to_thread(_finish, file, part, dest, model_bytes, what)
    except BaseException:
        # A close and an unlink: done inline so a second cancellation cannot skip them.
        _discard(file, part)
        raise
    return written


async def _stream_body(
    resp: aiohttp.ClientResponse,
    file: BinaryIO,
    part: Path,
    timer: ProgressTimer,
    limit: int | None,
    what: str,
) -> int:
    """Write the body to ``file``; more than ``limit`` bytes is not the job's model."""
    written = 0
    batch = bytearray()
    async for chunk in body_pieces(resp.content):
        timer.progress(len(chunk))
        batch += chunk
        if limit is not None and written + len(batch) > limit:
            raise ModelFormatError(
                f"{what}: the server sent more than the {limit} bytes of the job's model"
            )
        if len(batch) >= BATCH_BYTES:
            await asyncio.to_thread(_write, file, part, batch)
            written += len(batch)
            batch = bytearray()
    if batch:
        await asyncio.to_thread(_write, file, part, batch)
        written += len(batch)
    return written


def _open_part(part: Path) -> BinaryIO:
    try:
        return open(part, "wb")  # closed by _finish or _discard
    except OSError as exc:
        raise StorageError(f"{part}: cannot create: {exc.strerror}") from None


def _write(file: BinaryIO, part: Path, data: bytearray) -> None:
    try:
        file.write(data)
    except OSError as exc:
        raise StorageError(f"{part}: cannot write: {exc.strerror}") from None


def _check_model(part: Path, model_bytes: int, what: str) -> None:
    """The file is a whole safetensors model of the job's size (its header says so)."""
    try:
        layout = read_layout(part)  # also: the header describes exactly the file's bytes
    except ModelFormatError as exc:
        raise ModelFormatError(f"{what}: the downloaded file is not a whole model: {exc}") from None
    if model_bytes and layout.file_size != model_bytes:
        raise ModelFormatError(
            f"{what}: the downloaded model has {layout.file_size} bytes; the job's model "
            f"has {model_bytes}"
        )


def _finish(file: BinaryIO, part: Path, dest: Path, model_bytes: int, what: str) -> None:
    try:
        file.flush()
        os.fsync(file.fileno())
        file.close()
        _check_model(part, model_bytes, what)
        os.replace(part, dest)
    except OSError as exc:
        raise StorageError(f"{dest}: cannot save the download: {exc.strerror}") from None


def _discard(file: BinaryIO, part: Path) -> None:
    file.close()
    part.unlink(missing_ok=True)
