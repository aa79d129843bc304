"""``fl-admin download``: a job's global model, resumable and checked against its manifest.

Theory of operation. The round is fixed first (``--round``, else the job's latest), so
that the manifest and every byte fetched name the same model even if a round closes
meanwhile. The round's manifest (``GET .../manifest?round=N``) gives the size, the cut
into segments, a digest per segment and the whole digest; the bytes come from
``GET .../model?round=N`` through the site's downloader (``fl_client.site.download``):
one range request per segment, a window of them at a time, each segment checked
against the manifest as it arrives (a mismatch or a broken connection fetches it again,
as the outcome table says, up to ``max_segment_attempts``) and recorded in a journal.

The download in progress lives in a hidden folder beside the output,
``.<name>.fl-download/``, as ``<whole digest>.safetensors.part`` and its journal. Run
again with the same arguments after a break or a kill, the command finds them and
fetches only the segments the journal lists and the disk still confirms, so at most
the window in flight is fetched twice. The files are named by the model's whole
digest: a run for another round or job never trusts bytes of a different model, and
drops them. Once every segment is verified, the file's header must be the manifest's
layout and the manifest's segment digests must make its whole digest (then the file
has it: each of its segments has its digest). The file then becomes the output, or,
for a job whose input model was a sharded checkpoint, is written out as its shards in
the output folder; then the hidden folder goes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from common import wire
from common.checkpoint import CheckpointLayout, write_checkpoint
from common.config import TransferSettings
from common.digest import whole_digest
from common.errors import FLError, IntegrityError, ModelFormatError, ProtocolError
from common.http_client import Api, map_transport_errors, parse_reply, raise_for_error, read_bounded
from common.modelio import read_layout
from common.segments import Segments
from common.storage import on_disk
from common.tensorfile import Manifest
from common.timeouts import ProgressTimer, Stage
from fl_client.admin.api import job_status
from fl_client.admin.download_view import DownloadView
from fl_client.site.transfer import TransferContext, download_model

# the route that names the checkpoint layout of a job's input model (404: it has none)
JOB_CHECKPOINT = wire.API + "/admin/jobs/{job_id}/checkpoint"
CHECKPOINT_REPLY_MAX_BYTES = 1024 * 1024
CHECKPOINT_CHUNK_BYTES = 64 * 1024 * 1024
WORK_SUFFIX = ".fl-download"

Shard = Callable[[Path], list[Path]]  # writes the shards of a whole model; their paths


@dataclass(frozen=True)
class Written:
    path: Path
    nbytes: int


def _job_path(route: str, job_id: str) -> str:
    return route.format(job_id=quote(job_id, safe=""))


def work_dir(out: Path) -> Path:
    """Where the download into ``out`` keeps what a later run resumes from."""
    return out.with_name(f".{out.name}{WORK_SUFFIX}")


def check_whole(man: Manifest, what: str) -> None:
    """The manifest's segment digests must make its whole digest, and cut its file."""
    count = Segments(man.file_size, man.segment_bytes).count
    if man.num_segments != count:
        raise ProtocolError(
            f"{what}: the manifest lists {man.num_segments} segment digests for the "
            f"{count} segments of its file"
        )
    got = whole_digest(man.segment_digests)
    if got != man.digest:
        raise IntegrityError(
            f"{what}: the segments make whole digest {got}, the manifest says {man.digest}; "
            "the server's model and its manifest disagree"
        )


def drop_others(work: Path, keep: str) -> None:
    """Blocking: remove what the folder holds of downloads of other models."""
    with on_disk("download folder", work, "create"):
        work.mkdir(parents=True, exist_ok=True)
    for entry in work.iterdir():
        if not entry.name.startswith(keep + "."):
            with on_disk("stale download", entry, "remove"):
                entry.unlink()


def place(model: Path, out: Path, shard: Shard | None) -> list[Written]:
    """Blocking: the whole, verified ``model`` becomes ``out`` (or its shards there).

    Its folder of temporaries goes with it: a finished download leaves none.
    """
    if shard is None:
        with on_disk("download", out, "save"):
            size = model.stat().st_size
            os.replace(model, out)
        written = [Written(out, size)]
    else:
        with on_disk("checkpoint folder", out, "create"):
            out.mkdir(parents=True, exist_ok=True)
        paths = shard(model)
        with on_disk("checkpoint", out, "read"):
            written = [Written(p, p.stat().st_size) for p in paths]
    with on_disk("download folder", model.parent, "remove"):
        shutil.rmtree(model.parent)
    return written


def sharder(layout: CheckpointLayout | None, out: Path) -> Shard | None:
    """How a sharded checkpoint is written into ``out``; None for one file."""
    if layout is None or not layout.is_sharded:
        return None
    return lambda model: write_checkpoint(model, layout, out, CHECKPOINT_CHUNK_BYTES)


async def fetch_manifest(a: Api, job_id: str, rnd: int) -> Manifest:
    path = _job_path(wire.JOB_MANIFEST, job_id)
    man = await a.call("GET", path, Manifest, params={"round": str(rnd)})
    if man is None:
        raise ProtocolError(f"GET {path}: the server sent no manifest")
    return man


async def checkpoint_layout(a: Api, job_id: str) -> CheckpointLayout | None:
    """The checkpoint layout of the job's input model; None without one.

    A 404 is "no layout": the job's model was generated, or the server predates the
    route (its answer is then no ``NotFound`` of ours, hence the status, not the class).
    """
    path = _job_path(JOB_CHECKPOINT, job_id)
    what = f"GET {path}"
    timeout = a.timeouts.communication_timeout
    with map_transport_errors(a.base_url, f"{what} to {a.base_url}"):
        async with (
            ProgressTimer(timeout, stage=Stage.WAITING, peer=a.base_url, what=what) as timer,
            a.session.get(a.url(path)) as resp,
        ):
            timer.enter(Stage.RECEIVING)
            if resp.status == 404:
                return None
            await raise_for_error(resp)
            raw = await read_bounded(resp, CHECKPOINT_REPLY_MAX_BYTES, what, timer)
    return parse_reply(CheckpointLayout, raw, what)


def _check_header(model: Path, man: Manifest, what: str) -> None:
    """Blocking: the verified file's safetensors header is the manifest's layout."""
    if read_layout(model) != man.layout:
        model.unlink()  # its digests are the manifest's: fetching it again would not help
        raise ModelFormatError(f"{what}: the file's header is not the manifest's layout")


async def download(
    a: Api,
    job_id: str,
    out: Path,
    *,
    round: int | None,
    view: DownloadView,
    settings: TransferSettings | None = None,
) -> list[Written]:
    """Download the job's model after ``round`` (default: the latest) into ``out``.

    Resumes what an earlier run with the same ``out`` left; every failure names the job
    and the round.
    """
    rnd = round if round is not None else (await job_status(a, job_id)).job.round
    what = f"model of job {job_id} round {rnd}"
    try:
        man = await fetch_manifest(a, job_id, rnd)
        check_whole(man, what)
        layout = await checkpoint_layout(a, job_id)
        work = work_dir(out)
        await asyncio.to_thread(drop_others, work, man.digest)
        model = work / f"{man.digest}.safetensors"
        url = _job_path(wire.JOB_MODEL, job_id) + f"?round={rnd}"
        ctx = TransferContext(a, settings or TransferSettings(), view.add, asyncio.Event())
        view.start(what, man.file_size)
        try:
            await download_model(ctx, url, man, model)
        finally:
            view.close()
        await asyncio.to_thread(_check_header, model, man, what)
        return await asyncio.to_thread(place, model, out, sharder(layout, out))
    except FLError as err:
        if job_id in err.message and f"round {rnd}" in err.message:
            raise  # the server's words name them already
        raise type(err)(f"{what}: {err.message}", field=err.field) from err
