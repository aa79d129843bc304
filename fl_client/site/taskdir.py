"""One task's folder in the workspace: what is done so far, and whether it still holds.

    tasks/<task_id>/model.safetensors        the global model, complete and verified
    tasks/<task_id>/model.safetensors.part   ... while downloading, with its ``.segments``
    tasks/<task_id>/update.safetensors       the trained update
    tasks/<task_id>/update.json              its record: manifest, samples, metrics

The record is written last, once the update is complete, and atomically and durably,
so a killed daemon leaves no record or one whose update was complete. The update itself
is not fsynced (it is deleted as soon as the server holds it; syncing it would push it
all to the disk): a daemon that finds a record it did not write checks the update
against it (size and every segment's digest) before uploading, which also catches an
update a power loss tore. Reading the update once is cheap next to sending it. A record
that does not hold is removed with its update, and the task is trained again.

Blocking file I/O throughout: call from a thread.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from common.modelio import fsync_dir, hash_file_segments
from common.recycle import FilePool
from common.storage import on_disk
from common.tensorfile import Manifest
from fl_client.site.trainer import TrainResult


@dataclass(frozen=True)
class TaskFiles:
    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / "model.safetensors"

    @property
    def update(self) -> Path:
        return self.folder / "update.safetensors"

    @property
    def model_part(self) -> Path:
        """The model while it downloads (named by ``fl_client.site.transfer``)."""
        return self.folder / "model.safetensors.part"

    @property
    def update_part(self) -> Path:
        """The update while it is written (named by ``ModelWriter``)."""
        return self.folder / "update.safetensors.part"

    @property
    def record(self) -> Path:
        return self.folder / "update.json"


@dataclass(frozen=True)
class SavedUpdate:
    manifest: Manifest
    result: TrainResult


def make_dir(what: str, path: Path) -> None:
    with on_disk(what, path, "create"):
        path.mkdir(parents=True, exist_ok=True)


def drop_folder(folder: Path, pool: FilePool) -> None:
    """Remove a task's folder; its model-size files go to ``pool`` for reuse."""
    files = TaskFiles(folder)
    for path in (files.model, files.update, files.model_part, files.update_part):
        pool.retire(path)
    shutil.rmtree(folder, ignore_errors=True)


def forget_others(tasks_dir: Path, keep: str, pool: FilePool) -> None:
    """Remove the folders of other tasks: their rounds are over."""
    for d in tasks_dir.iterdir():
        if d.is_dir() and d.name != keep:
            drop_folder(d, pool)


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` after this returns, also across a crash; never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with on_disk("record", path, "write"):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)


def save_update(files: TaskFiles, saved: SavedUpdate) -> None:
    record = {
        "manifest": saved.manifest.model_dump(mode="json"),
        "num_samples": saved.result.num_samples,
        "metrics": saved.result.metrics,
    }
    write_atomic(files.record, json.dumps(record))


def update_problem(path: Path, man: Manifest) -> str | None:
    """What is wrong with the update at ``path`` given its manifest; None if it matches."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    if size != man.file_size:
        return f"{path} has {size} bytes, its record says {man.file_size}"
    with on_disk("update", path, "read"):
        actual = hash_file_segments(path, man.segment_bytes)
    bad = [i for i, want in enumerate(man.segment_digests) if actual.get(i) != want]
    if bad:
        return f"{path}: {len(bad)} of {man.num_segments} segments differ from its record"
    return None


def load_update(files: TaskFiles, *, check: bool) -> tuple[SavedUpdate | None, str | None]:
    """The update trained before and why it cannot be used, as ``(saved, problem)``.

    ``(None, None)``: there is no record. ``(None, problem)``: there was one that does not
    hold; the record and update are gone now. ``check=False`` trusts the update without
    reading it: for the daemon that wrote it itself.
    """
    if not files.record.exists():
        return None, None
    try:
        with on_disk("record", files.record, "read"):
            data = json.loads(files.record.read_text(encoding="utf-8"))
        saved = SavedUpdate(
            Manifest.model_validate(data["manifest"]),
            TrainResult(int(data["num_samples"]), dict(data["metrics"])),
        )
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        problem: str | None = f"{files.record} cannot be read: {exc}"
    else:
        problem = update_problem(files.update, saved.manifest) if check else None
    if problem is None:
        return saved, None
    with on_disk("record", files.record, "remove"):
        files.record.unlink(missing_ok=True)
        files.update.unlink(missing_ok=True)
    return None, problem
