"""Disk failures as ``StorageError``, translated where the files are touched.

A full, read-only or failing disk is not the peer's fault and is not cured by sending
or asking again at once. On a site the daemon logs it, waits its backoff and tries
again; on the server the request gets a 507, or the job fails naming the file. Either
way an operator can tell it from a network problem by the message, which names what
was being done, the file and the operating system's reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeGuard

from common.errors import StorageError

# errno values that mean "this machine's storage refused", never "the network failed";
# used where one ``except OSError`` could see either (a segment received into a file)
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})


def describe(exc: OSError, path: Path) -> str:
    """The reason, plus the path the system named when it is not ``path`` (a parent)."""
    reason = exc.strerror or str(exc)
    other = exc.filename
    if other is not None and str(other) != str(path):
        reason += f" ({other})"
    return reason


def storage_error(exc: OSError, what: str, path: Path, action: str) -> StorageError:
    return StorageError(f"{what} {path}: cannot {action}: {describe(exc, path)}")


@contextlib.contextmanager
def on_disk(what: str, path: Path, action: str) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into a ``StorageError`` naming ``what`` and ``path``.

    For blocking code (run it in a thread): ``with on_disk("download journal", p, "append"):``.
    """
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, what, path, action) from exc


def is_disk_error(exc: BaseException) -> TypeGuard[OSError]:
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


def allocate(fd: int, size: int) -> None:
    """Make the file open at ``fd`` exactly ``size`` bytes long, its blocks allocated.

    Why not a sparse file: filling holes makes the filesystem allocate blocks page by
    page as they are written back, which on ext4 costs about three times the kernel
    time of writing into allocated blocks, and the disk runs at half speed meanwhile
    (4 GiB written and synced: 2.9-3.4 s of system time into a sparse file, 0.9-1.3 s
    into an allocated one, on the machine the benchmark ran on). Also, a disk without
    room for the whole file says so now, not part-way through it.

    A filesystem without ``fallocate`` gets a sparse file: not glibc's stand-in for
    ``posix_fallocate``, which writes a zero into every block that reads as zero and so
    could overwrite bytes another thread writes meanwhile. Existing bytes are kept.
    Blocking: call from a thread.
    """
    if os.fstat(fd).st_size > size:
        os.ftruncate(fd, size)
    try:
        _fallocate(fd, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    call = getattr(libc, "fallocate64", None)
    if call is None and ctypes.sizeof(ctypes.c_void_p) == 8:
        call = getattr(libc, "fallocate", None)  # a 64-bit offset already (musl)
    if call is None:
        return None  # not Linux
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    found: Callable[[int, int, int, int], int] = call
    return found


_FALLOCATE = _load_fallocate()


def _fallocate(fd: int, size: int) -> None:
    """Linux's ``fallocate(fd, 0, 0, size)``: blocks allocated, the size grown to ``size``."""
    if _FALLOCATE is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    while _FALLOCATE(fd, 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code != errno.EINTR:  # retried, as Python's own system calls are
            raise OSError(code, os.strerror(code))
