"""Where the server keeps things on disk; the one place that knows the paths."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from common.checkpoint import CheckpointLayout
from common.errors import ConfigError
from common.recycle import FilePool
from common.storage import on_disk
from common.tensorfile import Manifest

# spools and accumulators of a round kept for the next round to write over; the round
# trims it to its own count (see JobRunner), this only bounds it
MAX_SPARES = 64
# a job folder being deleted is renamed to this prefix first
DELETED_PREFIX = ".deleted-"


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.spares = FilePool(root / "spare", MAX_SPARES)

    @property
    def lock_path(self) -> Path:
        return self.root / "server.lock"

    def lock(self) -> int:
        """Take the workspace for this process: a descriptor holding an exclusive lock,
        released when it is closed or the process ends. A second server on the same
        workspace would issue the same tasks and write the same files: it is refused
        with a ``ConfigError`` naming the workspace."""
        with on_disk("workspace lock file", self.lock_path, "open"):
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
    def uploads_dir(self) -> Path:
        """Models admins uploaded for their jobs (``fl_server.staging``)."""
        return self.root / "uploads"

    @property
    def db_path(self) -> Path:
        return self.root / "state.db"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def model_path(self, job_id: str, rnd: int) -> Path:
        """Global model after round ``rnd`` (round 0: the initial model)."""
        return self.job_dir(job_id) / "models" / f"round-{rnd}.safetensors"

    def checkpoint_path(self, job_id: str) -> Path:
        """How the job's initial model was laid out (``common.checkpoint``), written when
        it is prepared: every round's model is written out in that layout on download.
        Beside ``models/``, not in it: that folder holds round models only, which the
        job's ``keep:`` drops."""
        return self.job_dir(job_id) / "checkpoint.json"

    def load_checkpoint(self, job_id: str) -> CheckpointLayout | None:
        path = self.checkpoint_path(job_id)
        if not path.exists():
            return None
        return CheckpointLayout.model_validate_json(path.read_text())

    def manifest_path(self, job_id: str, rnd: int) -> Path:
        return self.job_dir(job_id) / "models" / f"round-{rnd}.manifest.json"

    def rounds_dir(self, job_id: str) -> Path:
        """Spools and accumulators of the job's rounds not closed yet."""
        return self.job_dir(job_id) / "rounds"

    def round_dir(self, job_id: str, rnd: int) -> Path:
        return self.rounds_dir(job_id) / str(rnd)

    def accumulator_path(self, job_id: str, rnd: int, folded: int) -> Path:
        return self.round_dir(job_id, rnd) / f"acc-{folded}.f64"

    def eager_path(self, job_id: str, rnd: int) -> Path:
        """The next global model while it is written as updates arrive (see eager)."""
        return self.round_dir(job_id, rnd) / "eager.safetensors.part"

    def spool_path(self, job_id: str, rnd: int, task_id: str) -> Path:
        return self.round_dir(job_id, rnd) / "spool" / f"{task_id}.safetensors"

    def drop_models(self, job_id: str, rounds: Iterable[int]) -> None:
        """Delete the global models (and manifests) of these rounds, where they exist."""
        for rnd in rounds:
            self.model_path(job_id, rnd).unlink(missing_ok=True)
            self.manifest_path(job_id, rnd).unlink(missing_ok=True)

    def delete_job(self, job_id: str, records: Callable[[], None]) -> None:
        """Delete a job's folder and, in between, its ``records``: the folder is first
        renamed (atomic), so a crash leaves either the job whole or a leftover that
        ``remove_leftovers`` clears, never records without their files."""
        trash = self.root / "jobs" / f"{DELETED_PREFIX}{job_id}"
        with contextlib.suppress(FileNotFoundError):
            self.job_dir(job_id).rename(trash)
        records()
        shutil.rmtree(trash, ignore_errors=True)

    def remove_leftovers(self) -> None:
        """Folders of deletions a crash interrupted."""
        with contextlib.suppress(FileNotFoundError):
            for d in (self.root / "jobs").iterdir():
                if d.name.startswith(DELETED_PREFIX):
                    shutil.rmtree(d, ignore_errors=True)

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
