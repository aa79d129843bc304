"""The staged uploads on disk: made once, resumed from the journal, nothing outside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.digest import segment_digest
from common.errors import Conflict, NotFound, RequestError, StorageError
from common.uploads import describe
from common.wire import UploadFile
from fl_server.staging import Staging

SEG = 4


def _stage(staging: Staging, data: bytes, indices: list[int]) -> str:
    digests = [segment_digest(data[i : i + SEG]) for i in range(0, len(data), SEG)]
    desc = describe(
        SEG, [UploadFile(name="model.safetensors", size=len(data), segment_digests=digests)]
    )
    staging.create(desc.digest, desc)
    fd = staging.open_file(desc.digest, "model.safetensors")
    try:
        for i in indices:
            os.pwrite(fd, data[i * SEG : (i + 1) * SEG], i * SEG)
            staging.record(desc.digest, fd, 0, i, digests[i])
    finally:
        os.close(fd)
    return desc.digest


def test_acknowledged_segments_survive_a_restart_and_a_whole_upload_is_staged(
    tmp_path: Path,
) -> None:
    data = bytes(range(10))
    upload_id = _stage(Staging(tmp_path), data, [0])
    again = Staging(tmp_path)  # a restarted server
    desc = again.description(upload_id)
    assert again.held(upload_id, desc) == [{0: desc.files[0].segment_digests[0]}]
    with pytest.raises(Conflict, match="2 of 3 segments missing"):
        again.verified(upload_id)
    _stage(again, data, [1, 2])  # the same description: the session is kept, not made anew
    source = again.staged_source(upload_id)
    assert source == tmp_path / upload_id / "model" / "model.safetensors"
    assert source.read_bytes() == data
    [summary] = again.summaries()
    assert summary.complete and summary.bytes_done == summary.bytes_total == 10
    again.remove(upload_id)
    with pytest.raises(NotFound):
        again.description(upload_id)


def test_ids_and_names_cannot_leave_the_folder_nor_follow_links(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "uploads")
    with pytest.raises(RequestError):
        staging.folder("../" + "a" * 29)
    upload_id = _stage(staging, b"abcdefgh", [])
    with pytest.raises(RequestError):
        staging.file_path(upload_id, "../upload.json")
    outside = tmp_path / "secret"
    outside.write_bytes(b"x")
    staged = staging.file_path(upload_id, "model.safetensors")
    staged.unlink()
    staged.symlink_to(outside)
    with pytest.raises(StorageError):
        os.close(staging.open_file(upload_id, "model.safetensors"))
    assert outside.read_bytes() == b"x"
