"""Where the server keeps things on disk; the one place that knows the paths."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from common.errors import StorageError
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
