"""Where uploaded models wait for their job: one folder per upload (blocking: use threads).

Layout of ``<workspace>/uploads/<upload_id>/``: ``upload.json``, the description the
admin sent (written last when the session is made, so its presence means the files
below exist at their full size); ``journal``, one ``<file> <index> <digest>`` line per
acknowledged segment (``common.uploads``), appended only after the segment's bytes
were synced, so a server restart resumes exactly what was acknowledged; ``model/``,
the files themselves, under their plain names (a single file, or an index and its
shards).

Nothing here follows a symbolic link or takes a name that is not a plain file name:
the upload id must be the hex digest ``common.config.UPLOAD_ID_PATTERN`` describes,
file names pass ``common.uploads.check_file_name``, and files are opened with
``O_NOFOLLOW``. The staged folder is not under ``model_dirs``: the admin sent it, and
the job reads nothing else through it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pydantic import ValidationError

from common.config import UPLOAD_ID_PATTERN
from common.errors import NotFound, RequestError, StorageError
from common.storage import allocate, on_disk
from common.uploads import (
    INDEX_NAME,
    MAX_INDEX_BYTES,
    check_file_name,
    check_index_matches,
    check_verified,
    held_bytes,
    is_complete,
    is_sharded,
    journal_line,
    parse_journal,
)
from common.wire import UploadDescription, UploadSummary

DESCRIPTION_NAME = "upload.json"
JOURNAL_NAME = "journal"
MODEL_DIR_NAME = "model"
_ID = re.compile(UPLOAD_ID_PATTERN)
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def check_upload_id(upload_id: str) -> str:
    if not _ID.match(upload_id):
        raise RequestError(
            f"upload id {upload_id[:80]!r} is not one (32 lowercase hex digits)",
            field="upload_id",
        )
    return upload_id


class Staging:
    """The uploads under ``root``; ``busy`` holds the segments being received now."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.busy: set[tuple[str, int, int]] = set()  # (upload, file, segment)

    def folder(self, upload_id: str) -> Path:
        return self.root / check_upload_id(upload_id)

    def model_dir(self, upload_id: str) -> Path:
        return self.folder(upload_id) / MODEL_DIR_NAME

    def file_path(self, upload_id: str, name: str) -> Path:
        return self.model_dir(upload_id) / check_file_name(name)

    def create(self, upload_id: str, desc: UploadDescription) -> None:
        """Make the session's folder and its files at full size (a full disk is refused
        now, not after hours of sending); an existing session is left as it is."""
        folder = self.folder(upload_id)
        if (folder / DESCRIPTION_NAME).is_file():
            return
        with on_disk("upload folder", folder, "create"):
            self.model_dir(upload_id).mkdir(parents=True, exist_ok=True)
            for f in desc.files:
                path = self.file_path(upload_id, f.name)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
                try:
                    if os.fstat(fd).st_size != f.size:
                        allocate(fd, f.size)
                finally:
                    os.close(fd)
            tmp = folder / (DESCRIPTION_NAME + ".tmp")
            tmp.write_text(desc.model_dump_json())
            tmp.replace(folder / DESCRIPTION_NAME)

    def description(self, upload_id: str) -> UploadDescription:
        path = self.folder(upload_id) / DESCRIPTION_NAME
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            raise NotFound(
                f"no upload {upload_id} on this server (it was used by a job and removed, or "
                "never made): run fl-admin submit --model to upload the model",
                field="upload_id",
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        try:
            return UploadDescription.model_validate_json(raw)
        except ValidationError as exc:
            raise StorageError(f"{path} is damaged: {exc}") from None

    def held(self, upload_id: str, desc: UploadDescription) -> list[dict[int, str]]:
        """Per file, the acknowledged segments and their digests."""
        path = self.folder(upload_id) / JOURNAL_NAME
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            return [{} for _ in desc.files]
        with os.fdopen(fd, "r", encoding="ascii", errors="replace") as f:
            return parse_journal(f.read(), desc)

    def open_file(self, upload_id: str, name: str) -> int:
        """A descriptor to write segments of ``name`` into (closed by the caller)."""
        path = self.file_path(upload_id, name)
        with on_disk("uploaded model file", path, "open"):
            return os.open(path, os.O_WRONLY | _OPEN_FLAGS)

    def record(self, upload_id: str, fd: int, file_no: int, index: int, digest: str) -> None:
        """Sync the segment's bytes (written through ``fd``), then put it on record."""
        path = self.folder(upload_id) / JOURNAL_NAME
        with on_disk("upload journal", path, "append to"):
            os.fdatasync(fd)
            jfd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _OPEN_FLAGS, 0o600)
            try:
                os.write(jfd, journal_line(file_no, index, digest).encode("ascii"))
            finally:
                os.close(jfd)

    def verified(self, upload_id: str) -> UploadDescription:
        """The upload's description once it is whole and its digest checks; a shard
        folder's index must name only shards the upload holds."""
        desc = self.description(upload_id)
        check_verified(upload_id, desc, self.held(upload_id, desc))
        if is_sharded(desc):
            path = self.file_path(upload_id, INDEX_NAME)
            with on_disk("uploaded index", path, "read"):
                fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
                with os.fdopen(fd, "rb") as f:
                    raw = f.read(MAX_INDEX_BYTES + 1)
            check_index_matches(desc, raw[:MAX_INDEX_BYTES].decode("utf-8", "replace"))
        return desc

    def staged_source(self, upload_id: str) -> Path:
        """What the job prepares its model from: the file, or the shard folder."""
        desc = self.verified(upload_id)
        if is_sharded(desc):
            return self.model_dir(upload_id)
        return self.file_path(upload_id, desc.files[0].name)

    def summaries(self) -> list[UploadSummary]:
        out = []
        for entry in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not _ID.match(entry.name) or not (entry / DESCRIPTION_NAME).is_file():
                continue
            desc = self.description(entry.name)
            held = self.held(entry.name, desc)
            out.append(
                UploadSummary(
                    upload_id=entry.name,
                    bytes_total=sum(f.size for f in desc.files),
                    bytes_done=held_bytes(desc, held),
                    complete=is_complete(desc, held),
                )
            )
        return out

    def remove(self, upload_id: str) -> None:
        shutil.rmtree(self.folder(upload_id), ignore_errors=True)
