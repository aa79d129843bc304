"""Model-size files kept for reuse instead of deleted (blocking: call from a thread).

Why. Every round a daemon writes files of a model's size (a site: the downloaded model
and its update; the server: one spool per update) and drops them once the round has
moved on. Deleting such a file hands its page-cache memory back, and the next file
must then get fresh memory page by page: the kernel zeroes every page, and on a cloud
VM whose hypervisor takes free guest memory back (virtio-balloon free page reporting)
the first touch of each page is a fault in the host as well. Writing over a file that is
still cached costs a copy, and no block allocation in the file system either. On a
2-core VM writing 4 GiB ran at 0.4 to 1.1 GB/s into a new file and at 6 GB/s over the
cached one (``tests/bench`` shows what it does to a job).

So a file that is done with goes into the pool (a rename) and the next file of that kind
is a spare renamed into place, sized, and overwritten. That is safe because no reader of
these files trusts bytes it did not check: a download trusts only segments its journal
lists and whose digest matches, a spool only segments the server acknowledged, and an
update or model is written from its first byte to its last before anyone reads it.

The pool keeps at most ``max_files`` spares (the oldest go first) and is one folder on
the same file system as the files it serves, so moving in and out is a rename.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

from common.storage import allocate


class FilePool:
    """Spare files in ``folder``, handed out for reuse; thread-safe within one process."""

    def __init__(self, folder: Path, max_files: int) -> None:
        self.folder = folder
        self.max_files = max_files
        self._lock = threading.Lock()
        self._names = itertools.count()

    def spares(self) -> list[Path]:
        """The spare files, oldest first."""
        try:
            found = [p for p in self.folder.iterdir() if p.is_file()]
        except FileNotFoundError:
            return []
        return sorted(found, key=lambda p: p.name)

    def take(self, dest: Path, size: int) -> bool:
        """Make a spare ``dest``, ``size`` bytes long (its content stale); False if none.

        ``dest`` must not exist; if it appears meanwhile it is left alone and the spare
        stays in the pool. A spare at least ``size`` bytes long is preferred: a shorter
        one is extended, its new blocks allocated.
        """
        if self.max_files <= 0:
            return False
        with self._lock:
            spares = [(p, n) for p in self.spares() if (n := _size(p)) is not None]
            if not spares:
                return False
            bigger = [(p, n) for p, n in spares if n >= size]
            pick = min(bigger, key=_second) if bigger else max(spares, key=_second)
            try:
                if pick[1] != size:
                    _resize(pick[0], size)
                return _move_no_replace(pick[0], dest)
            except OSError:
                return False

    def retire(self, path: Path) -> None:
        """Move ``path`` into the pool, or delete it when the pool keeps nothing.

        A missing ``path`` is no error. Past ``max_files`` the oldest spares are deleted.
        """
        if self.max_files <= 0:
            path.unlink(missing_ok=True)
            return
        with self._lock:
            name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._names)}"
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                os.rename(path, self.folder / name)
            except FileNotFoundError:
                return
            except OSError:
                path.unlink(missing_ok=True)  # another file system: no reuse
                return
            self._trim(self.max_files)

    def trim(self, keep: int) -> None:
        """Delete the oldest spares beyond ``keep``."""
        with self._lock:
            self._trim(keep)

    def clear(self) -> None:
        self.trim(0)

    def _trim(self, keep: int) -> None:
        spares = self.spares()
        for p in spares[: max(0, len(spares) - keep)]:
            p.unlink(missing_ok=True)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _second(item: tuple[Path, int]) -> int:
    return item[1]


def _move_no_replace(src: Path, dest: Path) -> bool:
    """Rename ``src`` to ``dest`` unless ``dest`` exists; True if moved.

    A hard link then an unlink of the old name never replaces ``dest``: a plain rename
    would, and a segment written meanwhile into the replaced file would be lost. Where
    the file system has no hard links nothing is reused.
    """
    try:
        os.link(src, dest)
    except OSError:
        return False
    try:
        src.unlink()
    except OSError:
        dest.unlink(missing_ok=True)  # never two names for one file
        return False
    return True


def _resize(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        allocate(fd, size)
    finally:
        os.close(fd)
