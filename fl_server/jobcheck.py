"""What the server can tell about a job when it is submitted, before it takes anything.

A job whose initial model is a file must name a valid checkpoint under the server's
``model_dirs`` (``fl_server.modelgen.open_checkpoint``), and a job must fit the server's disk at its
peak (``fl_server.core.disk``): better refused now, with the numbers, than failed hours
later with a full disk.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from common import humanize
from common.config import MIB, FileModel, GeneratedModel, JobConfig, ModelSpec, UploadedModel
from common.errors import StorageError
from fl_server.core import disk
from fl_server.modelgen import open_checkpoint, tensor_shape
from fl_server.staging import Staging

# header bytes allowed for per tensor of a generated model: its JSON entry
HEADER_BYTES_PER_TENSOR = 256
ITEM_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def model_size(
    model: ModelSpec, model_dirs: tuple[Path, ...], staging: Staging | None = None
) -> tuple[int, int]:
    """The initial model's bytes (an upper bound for a generated one's header) and its
    number of elements. Blocking: reads a file model's headers."""
    if isinstance(model, GeneratedModel):
        numel = math.prod(tensor_shape(model))
        data = model.num_tensors * numel * ITEM_BYTES[model.dtype]
        return data + model.num_tensors * HEADER_BYTES_PER_TENSOR + MIB, model.num_tensors * numel
    if isinstance(model, UploadedModel):
        assert staging is not None, "uploaded models need the server's staging"
        upload_id = model.upload_id
        model = FileModel(path=staging.staged_source(upload_id))
        model_dirs = (staging.model_dir(upload_id),)
    # the file the checkpoint becomes inside the job; reading its headers also checks it
    layout, _ = open_checkpoint(model, model_dirs).plan()
    return layout.file_size, sum(t.numel for t in layout.tensors)


def check_fits(
    cfg: JobConfig,
    workspace: Path,
    model_dirs: tuple[Path, ...],
    sites: int,
    staging: Staging | None = None,
) -> None:
    """Refuse (507) a job whose peak disk need is more than the workspace's free disk.
    Blocking."""
    model_bytes, elements = model_size(cfg.model, model_dirs, staging)
    need = disk.peak_bytes(
        model_bytes=model_bytes,
        elements=elements,
        keep=cfg.keep,
        num_rounds=cfg.num_rounds,
        sites=sites,
    )
    free = shutil.disk_usage(workspace).free
    if need > free:
        held = disk.models_held(cfg.keep, cfg.num_rounds)
        raise StorageError(
            f"job {cfg.name!r} needs up to {humanize.size(need)} of disk at once and the "
            f"server's workspace {workspace} has {humanize.size(free)} free: a model of "
            f"{humanize.size(model_bytes)} x ({held} global models held by keep: + {sites} "
            f"update spools)"
            + (f" + 2 float64 accumulators of {humanize.size(elements * 8)}" if sites >= 3 else "")
            + "; free disk, keep fewer rounds (keep: in the job file) or use a smaller model",
            field="model",
        )
