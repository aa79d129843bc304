"""The checkpoint layout of a job's input model: the names ``fl-admin download`` relies on.

Placeholder for the module that writes a downloaded model back in its original
checkpoint layout (one file, or shards); it holds only what the download calls, so that
the download type-checks and its tests run. The full module replaces it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class CheckpointLayout(BaseModel):
    """How the job's input model was laid out on disk."""

    model_config = ConfigDict(frozen=True)

    shards: tuple[str, ...] = ()

    @property
    def is_sharded(self) -> bool:
        return len(self.shards) > 1


def write_checkpoint(
    model: Path, layout: CheckpointLayout, out: Path, chunk_bytes: int
) -> list[Path]:
    """Write ``model`` into ``out`` in ``layout``; the files written, in order."""
    raise NotImplementedError("writing a sharded checkpoint needs the full common.checkpoint")
