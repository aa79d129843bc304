"""The files of a download in progress: ``<model>.part`` and its journal ``<model>.segments``.

Blocking: call from a thread. Disk failures leave as ``StorageError`` naming the file.
What the journal says is parsed by ``common.segments.parse_journal``.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.recycle import FilePool
from common.segments import journal_line, parse_journal
from common.storage import allocate, on_disk


def read_journal(path: Path) -> dict[int, str]:
    if not path.exists():
        return {}
    return parse_journal(path.read_text())


def append_journal(path: Path, index: int, digest: str) -> None:
    with on_disk("download journal", path, "append to"), open(path, "a") as f:
        f.write(journal_line(index, digest))


def prepare_part(part: Path, size: int) -> bool:
    """Make ``part`` a file of ``size`` bytes; True if it was one already (a resume)."""
    with on_disk("download", part, "create"):
        part.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size == size:
                return True
            allocate(fd, size)
            return False
        finally:
            os.close(fd)


def take_spare(pool: FilePool, part: Path, journal: Path, size: int) -> bool:
    """Start the download in a spare file of ``pool``; True if one was taken.

    None of its stale bytes counts: its journal is started afresh.
    """
    if part.exists():
        return False
    with on_disk("download", part, "create"):
        part.parent.mkdir(parents=True, exist_ok=True)
        if not pool.take(part, size):
            return False
        journal.unlink(missing_ok=True)
    return True
