"""Disk failures as ``StorageError``, translated where the files are touched.

A full, read-only or failing disk is not the peer's fault and is not cured by sending
or asking again at once. On a site the daemon logs it, waits its backoff and tries
again; on the server the request gets a 507, or the job fails naming the file. Either
way an operator can tell it from a network problem by the message, which names what
was being done, the file and the operating system's reason.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
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
