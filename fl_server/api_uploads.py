"""Handlers for models uploaded with a job: the server's terms, sessions, segments.

``POST /v1/admin/uploads`` takes a model's description (``common.uploads``) and
answers with the session its digest names, made if new, and what it already holds;
``PUT .../files/{name}/{index}`` streams one segment into the staged file
(``fl_server.staging``) and answers with the server's digest of what it stored. A
segment whose bytes do not have the digest the description declared is refused and
not recorded, so the admin sends it again; one already on record is received into
``/dev/null`` and acknowledged again (its acknowledgement was lost). One connection at
a time may deliver a segment, and an admin holds at most ``limits.max_uploads_per_client``
segment uploads open, as a site does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from aiohttp import web

from common.errors import IntegrityError, NotFound, RequestError, SegmentBusy
from common.segments import Segments, check_segment_request
from common.streams import body_pieces, receive_segment
from common.timeouts import ProgressTimer, Stage
from common.uploads import (
    MAX_UPLOAD_FILES,
    check_description,
    check_file_name,
    held_bytes,
    session_of,
)
from common.wire import DIGEST_HEADER, SegmentAck, UploadDescription, UploadsInfo
from fl_server.app_keys import CALLER, CONFIG, LIMITS, STAGING
from fl_server.http_util import json_reply, read_json
from fl_server.intake import open_in_thread, open_sink

log = logging.getLogger("fl_server.api")


def _admin(request: web.Request) -> str:
    """Who counts against the upload limit: the admin's certificate name with TLS."""
    return f"admin {request[CALLER].name}" if CALLER in request else "admin"


async def list_uploads(request: web.Request) -> web.Response:
    staging = request.app[STAGING]
    return json_reply(
        UploadsInfo(
            segment_bytes=request.app[CONFIG].segment_bytes,
            max_files=MAX_UPLOAD_FILES,
            uploads=await asyncio.to_thread(staging.summaries),
        )
    )


async def open_upload(request: web.Request) -> web.Response:
    """The session of the described model: new, or the one an earlier upload left."""
    staging = request.app[STAGING]
    desc = await read_json(request, UploadDescription)
    upload_id = check_description(desc, request.app[CONFIG].segment_bytes)
    await asyncio.to_thread(staging.create, upload_id, desc)
    held = await asyncio.to_thread(staging.held, upload_id, desc)
    done = held_bytes(desc, held)
    log.info(
        "upload %s opened: %d files, %d of %d bytes held",
        upload_id,
        len(desc.files),
        done,
        sum(f.size for f in desc.files),
    )
    return json_reply(session_of(upload_id, desc, held))


async def upload_status(request: web.Request) -> web.Response:
    staging = request.app[STAGING]
    upload_id = request.match_info["upload_id"]
    desc = await asyncio.to_thread(staging.description, upload_id)
    held = await asyncio.to_thread(staging.held, upload_id, desc)
    return json_reply(session_of(upload_id, desc, held))


async def upload_segment(request: web.Request) -> web.Response:
    staging = request.app[STAGING]
    upload_id = request.match_info["upload_id"]
    name = check_file_name(request.match_info["name"])
    desc = await asyncio.to_thread(staging.description, upload_id)
    file_no = next((n for n, f in enumerate(desc.files) if f.name == name), None)
    if file_no is None:
        raise NotFound(f"upload {upload_id} has no file {name!r}", field="name")
    spec = desc.files[file_no]
    req = check_segment_request(
        Segments(spec.size, desc.segment_bytes),
        index=request.match_info["index"],
        digest=request.headers.get(DIGEST_HEADER),
        weight=None,
        content_length=request.content_length,
    )
    what = f"segment {req.index} of {name} of upload {upload_id}"
    if req.digest != spec.segment_digests[req.index]:
        raise RequestError(
            f"{what}: {DIGEST_HEADER} is {req.digest}, the upload's description says "
            f"{spec.segment_digests[req.index]}",
            field=DIGEST_HEADER,
        )
    key = (upload_id, file_no, req.index)
    if key in staging.busy:
        raise SegmentBusy(f"{what} is already being received")
    caller, uploads = _admin(request), request.app[LIMITS].uploads
    uploads.acquire(caller)
    staging.busy.add(key)
    try:
        acked = req.index in (await asyncio.to_thread(staging.held, upload_id, desc))[file_no]
        if acked:  # its acknowledgement was lost: hash it again, keep what is stored
            fd = await open_in_thread(open_sink)
        else:
            fd = await open_in_thread(staging.open_file, upload_id, name)
        try:
            digest = await _receive(request, fd, req.start, req.size, what)
            if digest != req.digest:
                raise IntegrityError(
                    f"{what} arrived with digest {digest}, sender declared {req.digest}; "
                    "send it again",
                    field="body",
                )
            if not acked:
                await asyncio.to_thread(staging.record, upload_id, fd, file_no, req.index, digest)
        finally:
            os.close(fd)
        held = await asyncio.to_thread(staging.held, upload_id, desc)
    finally:
        staging.busy.discard(key)
        uploads.release(caller)
    return json_reply(
        SegmentAck(
            index=req.index,
            start=req.start,
            end=req.end,
            digest=digest,
            committed_bytes=held_bytes(desc, held),
        )
    )


async def _receive(request: web.Request, fd: int, start: int, size: int, what: str) -> str:
    """The segment's body at ``start`` of ``fd``; its digest."""
    cfg = request.app[CONFIG]
    timer = ProgressTimer(
        cfg.timeouts.communication_timeout,
        stage=Stage.RECEIVING,
        peer=request.remote or "admin",
        what=what,
    )
    started = time.monotonic()
    async with timer:
        digest = await receive_segment(
            body_pieces(request.content),
            fd,
            start,
            size,
            timer=timer,
            read_timeout_s=cfg.timeouts.streaming_read_timeout,
            batch_bytes=cfg.transfer.io_chunk_bytes,
            what="uploaded model file",
        )
    log.debug("%s received in %.2f s", what, time.monotonic() - started)
    return digest
