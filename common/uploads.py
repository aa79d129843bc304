"""Model uploads with a job, without I/O: names, descriptions, journals, what remains.

Theory of operation. ``fl-admin submit --model`` first describes the model: each file
(one ``.safetensors`` file, or a shard folder's index and shards) with its size and the
digest of every segment, cut at the server's ``segment_bytes``, and a digest of the
whole description. The server derives the upload's id from that digest, so the same
model describes the same session and a second ``submit`` resumes the first one's
upload. Segments then move as in a site's upload (``common.segments``): each checked
against the digest the description declared, acknowledged with the server's digest
of what it stored, and recorded in the upload's journal (``<file> <index> <digest>``
lines) only then. The server takes the upload for a job once every segment is on
record with the description's digest.

File names come from the admin (a single file is always sent as ``model.safetensors``;
a shard folder's names from its index): they must be plain names, never paths, so that
nothing the admin sends can name a file outside the upload's folder. This module
touches no socket, file or clock: values in, values or errors out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import xxhash

from common.errors import Conflict, ModelFormatError, RequestError, ResumeMismatch
from common.segments import Segments
from common.wire import UploadDescription, UploadFile, UploadFileStatus, UploadSession

SINGLE_FILE_NAME = "model.safetensors"  # the name a single-file model is uploaded under
INDEX_NAME = "model.safetensors.index.json"  # the index of a shard folder
SHARD_SUFFIX = ".safetensors"
MAX_UPLOAD_FILES = 4096  # shards of one model; real ones have tens to hundreds
MAX_NAME_BYTES = 255  # a file name on every common file system
MAX_INDEX_BYTES = 64 * 1024 * 1024  # an index lists tensor names: a few MB at most
_DIGEST = re.compile(r"^[0-9a-f]{16}$")  # xxh3-64, as common.digest writes it

# -- names --------------------------------------------------------------------------------


def check_file_name(name: str, field: str = "name") -> str:
    """``name`` if it is a plain file name: not empty, no separator, no ``..``, no leading
    dot, no control character; a ``RequestError`` naming ``field`` otherwise."""
    why = None
    if not name:
        why = "is empty"
    elif "/" in name or "\\" in name:
        why = "contains a path separator"
    elif ".." in name:
        why = "contains '..'"
    elif name.startswith("."):
        why = "starts with a dot"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "contains a control character"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        why = f"is longer than {MAX_NAME_BYTES} bytes"
    if why is not None:
        raise RequestError(
            f"{field}: file name {name!r} {why}; a model's files must be plain file names "
            "in one folder",
            field=field,
        )
    return name


def shard_names(index_text: str, where: str) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` names, each checked, in order.

    ``where`` names the index in errors. A name that is not a plain file name is a
    ``RequestError``; an index that is not an index, a ``ModelFormatError``.
    """
    try:
        data = json.loads(index_text)
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{where}: not valid JSON: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(f"{where}: no 'weight_map' of tensor names to shard files")
    names: list[str] = []
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ModelFormatError(f"{where}: weight_map[{tensor!r}] is not a file name")
        if shard not in names:
            names.append(check_file_name(shard, field=f"{where}: weight_map[{tensor!r}]"))
    for shard in names:
        if not shard.endswith(SHARD_SUFFIX) or shard == INDEX_NAME:
            raise ModelFormatError(f"{where}: shard {shard!r} is not a {SHARD_SUFFIX} file")
    if len(names) + 1 > MAX_UPLOAD_FILES:
        raise ModelFormatError(
            f"{where}: {len(names)} shards, more than the {MAX_UPLOAD_FILES - 1} an upload takes"
        )
    return names


# -- the description ----------------------------------------------------------------------


def model_digest(segment_bytes: int, files: Iterable[UploadFile]) -> str:
    """The digest of a model's description: cut, names, sizes and every segment digest.

    The upload's id is this digest, so the same files cut the same way are the same
    session, and a different byte anywhere is a different one.
    """
    h = xxhash.xxh3_128()
    h.update(f"fl-stream upload 1\n{segment_bytes}\n".encode())
    for f in files:
        h.update(f"{f.name}\n{f.size}\n{' '.join(f.segment_digests)}\n".encode())
    return str(h.hexdigest())


def describe(segment_bytes: int, files: Iterable[UploadFile]) -> UploadDescription:
    listed = list(files)
    return UploadDescription(
        segment_bytes=segment_bytes, files=listed, digest=model_digest(segment_bytes, listed)
    )


def is_sharded(desc: UploadDescription) -> bool:
    return any(f.name == INDEX_NAME for f in desc.files)


def check_description(desc: UploadDescription, segment_bytes: int) -> str:
    """A description the server can take: its cut, names, segment digests and digest.
    Returns the upload's id. Every refusal is a ``RequestError`` naming the field."""
    if desc.segment_bytes != segment_bytes:
        raise RequestError(
            f"segment_bytes: the server cuts uploads in segments of {segment_bytes} bytes, "
            f"the description says {desc.segment_bytes}; describe the model again",
            field="segment_bytes",
        )
    if len(desc.files) > MAX_UPLOAD_FILES:
        raise RequestError(
            f"files: {len(desc.files)} files, more than the {MAX_UPLOAD_FILES} an upload takes",
            field="files",
        )
    seen: set[str] = set()
    for i, f in enumerate(desc.files):
        field = f"files.{i}"
        check_file_name(f.name, field=f"{field}.name")
        if f.name in seen:
            raise RequestError(f"{field}.name: {f.name!r} is listed twice", field=f"{field}.name")
        seen.add(f.name)
        count = Segments(f.size, segment_bytes).count
        if len(f.segment_digests) != count:
            raise RequestError(
                f"{field}.segment_digests: {f.name} of {f.size} bytes has {count} segments, "
                f"the description lists {len(f.segment_digests)} digests",
                field=f"{field}.segment_digests",
            )
        if not all(_DIGEST.match(d) for d in f.segment_digests):
            raise RequestError(
                f"{field}.segment_digests: each must be 16 lowercase hex digits (xxh3-64)",
                field=f"{field}.segment_digests",
            )
    _check_shape(desc)
    digest = model_digest(segment_bytes, desc.files)
    if desc.digest != digest:
        raise RequestError(
            f"digest: the description's digest is {desc.digest}, its contents give {digest}",
            field="digest",
        )
    return digest


def _check_shape(desc: UploadDescription) -> None:
    """One safetensors file, or an index with its ``.safetensors`` shards."""
    names = [f.name for f in desc.files]
    if not is_sharded(desc):
        if len(names) != 1 or not names[0].endswith(SHARD_SUFFIX):
            raise RequestError(
                f"files: a model is one {SHARD_SUFFIX} file, or {INDEX_NAME} with its shards; "
                f"got {', '.join(names[:5])}",
                field="files",
            )
        return
    others = [n for n in names if n != INDEX_NAME]
    bad = [n for n in others if not n.endswith(SHARD_SUFFIX)]
    if not others or bad:
        raise RequestError(
            f"files: a shard folder is {INDEX_NAME} and {SHARD_SUFFIX} shards; "
            + (f"not a shard: {bad[0]}" if bad else "no shard listed"),
            field="files",
        )


def check_index_matches(desc: UploadDescription, index_text: str) -> None:
    """The uploaded index names only shards the upload holds (each a plain name)."""
    names = {f.name for f in desc.files}
    for shard in shard_names(index_text, INDEX_NAME):
        if shard not in names:
            raise ModelFormatError(f"{INDEX_NAME} names shard {shard!r}, which was not uploaded")


# -- the journal --------------------------------------------------------------------------


def journal_line(file_no: int, index: int, digest: str) -> str:
    return f"{file_no} {index} {digest}\n"


def parse_journal(text: str, desc: UploadDescription) -> list[dict[int, str]]:
    """Per file of ``desc``, ``{index: digest}`` of the segments on record.

    Only entries that name a segment of the description with its declared digest
    count: a line torn by a crash, or any garbage, names nothing, and that segment is
    sent again.
    """
    held: list[dict[int, str]] = [{} for _ in desc.files]
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts[:2]):
            continue
        file_no, index, digest = int(parts[0]), int(parts[1]), parts[2]
        if file_no < len(desc.files):
            digests = desc.files[file_no].segment_digests
            if index < len(digests) and digests[index] == digest:
                held[file_no][index] = digest
    return held


def session_of(
    upload_id: str, desc: UploadDescription, held: list[dict[int, str]]
) -> UploadSession:
    files = [
        UploadFileStatus(
            name=f.name,
            size=f.size,
            num_segments=len(f.segment_digests),
            segments_done=sorted(h),
        )
        for f, h in zip(desc.files, held, strict=True)
    ]
    complete = is_complete(desc, held)
    return UploadSession(
        upload_id=upload_id,
        segment_bytes=desc.segment_bytes,
        digest=desc.digest,
        files=files,
        complete=complete,
    )


def is_complete(desc: UploadDescription, held: Sequence[Collection[int]]) -> bool:
    return all(len(h) == len(f.segment_digests) for f, h in zip(desc.files, held, strict=True))


def held_bytes(desc: UploadDescription, held: Sequence[Collection[int]]) -> int:
    """Bytes of ``desc`` in the segments ``held`` (per file, in the description's order)."""
    return sum(
        Segments(f.size, desc.segment_bytes).bytes_of(h)
        for f, h in zip(desc.files, held, strict=True)
    )


def check_verified(upload_id: str, desc: UploadDescription, held: list[dict[int, str]]) -> None:
    """The upload is whole: every segment on record, and the digests on record give the
    description's digest. A ``Conflict``-class error naming what is missing otherwise."""
    missing = [
        (f.name, i)
        for f, h in zip(desc.files, held, strict=True)
        for i in range(len(f.segment_digests))
        if i not in h
    ]
    if missing:
        total = sum(len(f.segment_digests) for f in desc.files)
        shown = ", ".join(f"{n}#{i}" for n, i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise Conflict(
            f"upload {upload_id} is incomplete: {len(missing)} of {total} segments missing "
            f"({shown}); run the same fl-admin submit --model again to resume it",
            field="model.upload_id",
        )
    recorded = [
        UploadFile(name=f.name, size=f.size, segment_digests=[h[i] for i in range(len(h))])
        for f, h in zip(desc.files, held, strict=True)
    ]
    if model_digest(desc.segment_bytes, recorded) != desc.digest:
        raise Conflict(
            f"upload {upload_id}: the segments on record do not give its digest {desc.digest}",
            field="model.upload_id",
        )


# -- the admin's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentRef:
    """Segment ``index`` of file ``file_no`` of a description."""

    file_no: int
    index: int


def upload_todo(desc: UploadDescription, session: UploadSession) -> list[SegmentRef]:
    """The segments the server does not hold yet, file by file, in order.

    The session must be the one for this very description (same cut, files, sizes):
    otherwise its segments are not ours.
    """
    ours = [(f.name, f.size) for f in desc.files]
    theirs = [(f.name, f.size) for f in session.files]
    if (
        session.digest != desc.digest
        or session.segment_bytes != desc.segment_bytes
        or ours != theirs
    ):
        raise ResumeMismatch(
            f"the server's upload {session.upload_id} is not of this model "
            f"(digest {session.digest}, ours {desc.digest})"
        )
    return [
        SegmentRef(n, i)
        for n, (f, st) in enumerate(zip(desc.files, session.files, strict=True))
        for i in Segments(f.size, desc.segment_bytes).remaining(set(st.segments_done))
    ]
