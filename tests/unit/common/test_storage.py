"""Model-size files are made with their blocks allocated, or sparse where that fails."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from common import storage
from common.storage import allocate

MIB = 1024 * 1024


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _fs_allocates(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)
    try:
        storage._fallocate(fd, MIB)
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()
    return True


def test_a_new_file_gets_its_size_and_its_blocks(tmp_path: Path) -> None:
    if not _fs_allocates(tmp_path):
        pytest.skip("this filesystem does not allocate ahead")
    path = tmp_path / "spool"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        allocate(fd, 8 * MIB + 5)
    finally:
        os.close(fd)
    assert path.stat().st_size == 8 * MIB + 5
    assert _allocated(path) >= 8 * MIB  # not a hole to be filled page by page


def test_a_longer_file_is_cut_and_a_shorter_one_grown_keeping_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "spare"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDWR)
    try:
        allocate(fd, 40)
        assert path.read_bytes() == b"x" * 40
        allocate(fd, 60)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 40 + b"\0" * 20


def _fallocate_fails(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refuse(fd: int, size: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(storage, "_fallocate", refuse)


def test_a_filesystem_without_fallocate_gets_a_sparse_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fallocate_fails(monkeypatch, errno.EOPNOTSUPP)
    path = tmp_path / "spool"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        allocate(fd, 3 * MIB)
    finally:
        os.close(fd)
    assert path.stat().st_size == 3 * MIB


def test_a_full_disk_is_reported_not_papered_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fallocate_fails(monkeypatch, errno.ENOSPC)
    fd = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError) as err:
            allocate(fd, MIB)
    finally:
        os.close(fd)
    assert err.value.errno == errno.ENOSPC


def test_a_refusal_of_the_system_call_itself_is_raised_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # fallocate needs a descriptor open for writing
    try:
        with pytest.raises(OSError) as err:
            allocate(fd, MIB)
    finally:
        os.close(fd)
    assert err.value.errno == errno.EBADF and err.value.strerror
