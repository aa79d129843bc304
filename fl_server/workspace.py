"""Where the server keeps things on disk; the one place that knows the paths."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from common.errors import ConfigError, StorageError
from common.tensorfile import Manifest


@contextlib.contextmanager
def on_disk(what: str, path: Path) -> Iterator[None]:
    """A failing file system call (ENOSPC, EIO, ...) in the block as a ``StorageError``
    naming the file and the system's reason."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{what}: {exc.filename or path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def no_partial_file(path: Path) -> Iterator[None]:
    """If the block fails, remove the ``.part`` file a ``ModelWriter`` of ``path`` left.

    The writer removes it on its own, except when closing the file fails as well: a full
    disk fails the final flush too, and the partial file would stay.
    """
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            path.with_name(path.name + ".part").unlink(missing_ok=True)
        raise


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @property
    def lock_path(self) -> Path:
        return self.root / "server.lock"

    def lock(self) -> int:
        """Take the workspace for this process: a descriptor holding an exclusive lock,
        released when it is closed or the process ends. A second server on the same
        workspace would issue the same tasks and write the same files: it is refused
        with a ``ConfigError`` naming the workspace."""
        with on_disk("cannot open the workspace's lock file", self.lock_path):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"workspace {self.root} is in use by another fl-server (it holds "
                f"{self.lock_path}); stop that one or give this one another workspace",
                field="workspace",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for an operator asking who holds it
        return fd

    @property
    def db_path(self) -> Path:
        return self.root / "state.db"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def model_path(self, job_id: str, rnd: int) -> Path:
        """Global model after round ``rnd`` (round 0: the initial model)."""
        return self.job_dir(job_id) / "models" / f"round-{rnd}.safetensors"

    def manifest_path(self, job_id: str, rnd: int) -> Path:
        return self.job_dir(job_id) / "models" / f"round-{rnd}.manifest.json"

    def rounds_dir(self, job_id: str) -> Path:
        """Spools and accumulators of the job's rounds not closed yet."""
        return self.job_dir(job_id) / "rounds"

    def round_dir(self, job_id: str, rnd: int) -> Path:
        return self.rounds_dir(job_id) / str(rnd)

    def accumulator_path(self, job_id: str, rnd: int, folded: int) -> Path:
        return self.round_dir(job_id, rnd) / f"acc-{folded}.f64"

    def spool_path(self, job_id: str, rnd: int, task_id: str) -> Path:
        return self.round_dir(job_id, rnd) / "spool" / f"{task_id}.safetensors"

    def save_manifest(self, job_id: str, rnd: int, manifest: Manifest) -> None:
        path = self.manifest_path(job_id, rnd)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(manifest.model_dump_json())
        tmp.replace(path)

    def load_manifest(self, job_id: str, rnd: int) -> Manifest | None:
        path = self.manifest_path(job_id, rnd)
        if not path.exists():
            return None
        return Manifest.model_validate_json(path.read_text())
