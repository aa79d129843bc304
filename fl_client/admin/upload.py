"""``fl-admin submit --model``: send a model to the server as digested segments, resumably.

Theory of operation. The model is a ``.safetensors`` file (sent as
``model.safetensors``) or a folder with ``model.safetensors.index.json`` and the
shards it names; every name is checked, and every file's header read, before anything
is sent. The files are hashed segment by segment (in a thread, in chunks) at the
segment size the server gives, into the description ``common.uploads`` defines; the
server answers it with the session the description's digest names, and which segments
it holds already. The rest go as streamed PUTs, a window at a time, each tried again
while its failure may pass (``common.outcomes``, through the site's own window,
``fl_client.site.window``); the server's acknowledgement must be its digest of what
it stored. An upload broken off (a cut connection, a killed command) is resumed by
running the same command again: same files, same digest, same session, and only the
segments the server never acknowledged are sent, at most one window of them again.

A progress bar (rich) goes to stderr when it is a terminal; standard output is left to
the job id.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from common import wire
from common.config import TransferSettings
from common.errors import ConfigError, Conflict, FLError, ModelFormatError, ProtocolError
from common.http_client import Api, map_transport_errors, parse_reply, raise_for_error, read_bounded
from common.modelio import hash_file_segments, read_layout
from common.segments import Segments, check_ack
from common.streams import file_range_chunks
from common.timeouts import ProgressTimer, Stage
from common.uploads import (
    INDEX_NAME,
    MAX_INDEX_BYTES,
    SINGLE_FILE_NAME,
    SegmentRef,
    describe,
    held_bytes,
    shard_names,
    upload_todo,
)
from fl_client.site.window import run_window, with_retries

ACK_MAX_BYTES = 4096  # an acknowledgement is ~150 bytes of JSON
HASH_BATCH_SEGMENTS = 8  # segments hashed per thread call: progress moves that often

Advance = Callable[[int], None]


@dataclass(frozen=True)
class ModelFile:
    name: str  # the plain name it has on the server
    path: Path  # where it is here


def model_files(path: Path) -> list[ModelFile]:
    """The files of the model at ``path``, checked (names, headers) before any is sent.

    Blocking. A bad shard name is the index's fault: ``ConfigError`` naming it, so that
    ``fl-admin`` exits 2 before it contacts the server.
    """
    if path.is_file():
        read_layout(path)  # a file that is no model fails here, not after the upload
        return [ModelFile(SINGLE_FILE_NAME, path)]
    if not path.is_dir():
        raise ConfigError(f"--model: {path} is neither a file nor a folder", field="--model")
    index = path / INDEX_NAME
    if not index.is_file():
        raise ConfigError(
            f"--model: folder {path} has no {INDEX_NAME}; give a .safetensors file or a "
            "folder of shards with their index",
            field="--model",
        )
    with open(index, "rb") as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise ModelFormatError(f"{index}: larger than {MAX_INDEX_BYTES} bytes")
    try:
        names = shard_names(raw.decode("utf-8"), str(index))
    except UnicodeDecodeError:
        raise ModelFormatError(f"{index}: not UTF-8 text") from None
    except FLError as err:
        if isinstance(err, ModelFormatError):
            raise
        raise ConfigError(f"--model: {err.message}", field=err.field) from None
    files = [ModelFile(INDEX_NAME, index)]
    for name in names:
        shard = path / name
        if not shard.is_file():
            raise ConfigError(f"--model: {index} names {name}, which is not a file in {path}")
        read_layout(shard)
        files.append(ModelFile(name, shard))
    return files


def _size(path: Path) -> int:
    return path.stat().st_size


def _hash(path: Path, segment_bytes: int, first: int, count: int) -> list[str]:
    got = hash_file_segments(path, segment_bytes, range(first, first + count))
    return [got[i] for i in range(first, first + count)]


async def describe_model(
    files: list[ModelFile], segment_bytes: int, advance: Advance
) -> wire.UploadDescription:
    """Every file's segment digests at ``segment_bytes``, hashed in a thread."""
    described = []
    for f in files:
        size = await asyncio.to_thread(_size, f.path)
        cut = Segments(size, segment_bytes)
        digests: list[str] = []
        for first in range(0, cut.count, HASH_BATCH_SEGMENTS):
            n = min(HASH_BATCH_SEGMENTS, cut.count - first)
            digests += await asyncio.to_thread(_hash, f.path, segment_bytes, first, n)
            advance(cut.bytes_of(range(first, first + n)))
        described.append(wire.UploadFile(name=f.name, size=size, segment_digests=digests))
    return describe(segment_bytes, described)


async def _then(chunks: AsyncIterator[bytes], done: Callable[[], None]) -> AsyncIterator[bytes]:
    """``chunks``, then ``done()``: the body is sent, the wait for the answer begins."""
    async for data in chunks:
        yield data
    done()


@dataclass(frozen=True)
class _Sender:
    api: Api
    settings: TransferSettings
    session: wire.UploadSession
    desc: wire.UploadDescription
    files: list[ModelFile]
    advance: Advance

    def what(self, ref: SegmentRef) -> str:
        return f"segment {ref.index} of {self.desc.files[ref.file_no].name}"

    async def send(self, ref: SegmentRef) -> None:
        api, spec = self.api, self.desc.files[ref.file_no]
        start, end = Segments(spec.size, self.desc.segment_bytes).range(ref.index)
        digest = spec.segment_digests[ref.index]
        what = f"upload of {self.what(ref)}"
        route = wire.UPLOAD_FILE_SEGMENT.format(
            upload_id=self.session.upload_id, name=quote(spec.name, safe=""), index=ref.index
        )
        timeouts = api.timeouts
        timer = ProgressTimer(
            timeouts.communication_timeout, stage=Stage.SENDING, peer=api.base_url, what=what
        )
        chunks = file_range_chunks(
            self.files[ref.file_no].path, start, end, self.settings.io_chunk_bytes, timer
        )
        sent = _then(chunks, lambda: timer.enter(Stage.WAITING, timeouts.streaming_ack_wait))
        headers = {wire.DIGEST_HEADER: digest}
        async with timer:
            with map_transport_errors(api.base_url, what):
                async with api.session.put(api.url(route), data=sent, headers=headers) as resp:
                    timer.enter(Stage.RECEIVING, timeouts.communication_timeout)
                    await raise_for_error(resp)
                    raw = await read_bounded(resp, ACK_MAX_BYTES, what, timer)
            ack = parse_reply(wire.SegmentAck, raw, what)
        check_ack(what, ack, ref.index, start, end, digest)
        self.advance(end - start)


@contextlib.contextmanager
def progress_bar(show: bool) -> Iterator[Callable[[str, int, int], Advance]]:
    """``start(label, done, total)`` gives the ``advance`` of a new bar (on stderr, only
    when ``show``); without a terminal every bar is silent."""
    if not show:
        yield lambda label, done, total: lambda n: None
        return
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        redirect_stdout=False,
        redirect_stderr=False,
    )
    with bars:

        def start(label: str, done: int, total: int) -> Advance:
            task = bars.add_task(label, total=total, completed=done)
            return lambda n: bars.advance(task, n)

        yield start


async def upload_model(
    api: Api, path: Path, settings: TransferSettings, *, show_progress: bool
) -> str:
    """Upload the model at ``path`` (or resume its upload); the upload id, once the
    server holds and has verified all of it."""
    files = await asyncio.to_thread(model_files, path)
    offer = await api.call("GET", wire.UPLOADS, wire.UploadsInfo)
    if offer is None:
        raise ProtocolError("GET uploads: the server sent no answer")
    total = sum([await asyncio.to_thread(_size, f.path) for f in files])
    with progress_bar(show_progress) as start:
        desc = await describe_model(files, offer.segment_bytes, start("hashing", 0, total))
        session = await api.call("POST", wire.UPLOADS, wire.UploadSession, body=desc)
        if session is None:
            raise ProtocolError("POST uploads: the server sent no answer")
        todo = upload_todo(desc, session)
        held = held_bytes(desc, [set(f.segments_done) for f in session.files])
        if held:
            print(
                f"upload {session.upload_id} resumes: the server holds {held} of {total} bytes",
                file=sys.stderr,
            )
        sender = _Sender(api, settings, session, desc, files, start("uploading", held, total))
        attempts = settings.max_segment_attempts
        await run_window(
            list(range(len(todo))),
            settings.window,
            lambda i: with_retries(sender.what(todo[i]), attempts, lambda: sender.send(todo[i])),
            asyncio.Event(),
        )
    route = wire.UPLOAD.format(upload_id=session.upload_id)
    final = await api.call("GET", route, wire.UploadSession)
    if final is None or not final.complete:
        raise Conflict(f"upload {session.upload_id}: the server does not hold all of it yet")
    return session.upload_id
