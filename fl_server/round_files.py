"""The file work of a round's effects: folds, early steps and the next global model.

The round core (``fl_server.core.round``) decides what to write from which inputs; this
maps its inputs to files of the workspace and runs the blocking work in the aggregation
thread through ``run_stoppable``, so that a job's abort or the server's stop ends it
within one chunk. Disk errors come out as ``StorageError`` naming the file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import shutil
from collections.abc import Iterable
from pathlib import Path

from common.storage import on_disk, storage_error
from common.tensorfile import Layout, Manifest
from fl_server import aggregate, eager
from fl_server.aggregate import Source
from fl_server.core.early import EarlyRound
from fl_server.core.round_events import Accumulator, Input, Spool
from fl_server.threads import run_stoppable
from fl_server.workspace import Workspace


class RoundFiles:
    """The files of one round of one job."""

    def __init__(
        self,
        ws: Workspace,
        job_id: str,
        rnd: int,
        layout: Layout,
        *,
        segment_bytes: int,
        chunk_bytes: int,
        aggregator: concurrent.futures.Executor,
    ) -> None:
        self.ws, self.job_id, self.rnd, self.layout = ws, job_id, rnd, layout
        self.segment_bytes, self.chunk_bytes = segment_bytes, chunk_bytes
        self._aggregator = aggregator
        self.dir = ws.round_dir(job_id, rnd)
        self.early_path = ws.eager_path(job_id, rnd)
        self.model_path = ws.model_path(job_id, rnd)
        # the round's global model: the next one takes its integer and bool tensors
        self.base_path = ws.model_path(job_id, rnd - 1)

    def path(self, item: Input) -> Path:
        if isinstance(item, Spool):
            return self.ws.spool_path(self.job_id, self.rnd, item.task_id)
        return self.ws.accumulator_path(self.job_id, self.rnd, item.count)

    def sources(self, inputs: Iterable[Input]) -> list[Source]:
        return [Source(self.path(i), i.weight if isinstance(i, Spool) else None) for i in inputs]

    def _files(self) -> list[Path]:
        return [p for p in [*self.dir.glob("*"), *self.dir.glob("spool/*")] if p.is_file()]

    # blocking: call through asyncio.to_thread

    def clean(self, keep: Iterable[Input]) -> None:
        """After a restart: drop half-written files, files no longer on record, and what
        is left of the folders of closed rounds."""
        with contextlib.suppress(FileNotFoundError):
            for d in self.ws.rounds_dir(self.job_id).iterdir():
                if d.name.isdigit() and int(d.name) < self.rnd:
                    shutil.rmtree(d, ignore_errors=True)
        kept = {self.path(i) for i in keep}
        for p in self._files():
            if p not in kept:
                p.unlink()

    def retire(self, keep: int) -> None:
        """Remove the closed round's folder; its spools and accumulators go to the pool,
        which keeps as many as the round had tasks: the next round needs about as many."""
        self._retire_files(self._files())
        self.ws.spares.trim(keep)
        shutil.rmtree(self.dir, ignore_errors=True)

    # async: the work runs in the aggregation thread

    async def fold(self, inputs: tuple[Input, ...], count: int) -> None:
        """Sum ``inputs`` into accumulator ``count``; the inputs go to the spare pool."""
        if not inputs:
            return  # a round's first update: its spool is the sum
        out = self.path(Accumulator(count))
        sources, layout, chunk_bytes = self.sources(inputs), self.layout, self.chunk_bytes
        with on_disk(f"accumulator {count}", out, "write"):
            await run_stoppable(
                self._aggregator,
                lambda stop: aggregate.fold(sources, layout, out, chunk_bytes, stop),
            )

    async def retire_inputs(self, inputs: tuple[Input, ...]) -> None:
        """Files of a model's size: the next ones are written over them."""
        await asyncio.to_thread(self._retire_files, [self.path(i) for i in inputs])

    def _retire_files(self, paths: Iterable[Path]) -> None:
        for p in paths:
            self.ws.spares.retire(p)

    async def drop_early(self) -> None:
        await asyncio.to_thread(self.early_path.unlink, True)

    async def early_step(
        self, tensors: tuple[int, ...], early: EarlyRound
    ) -> tuple[dict[int, str], int] | None:
        """Write ``tensors`` into the early aggregate: the digests of the segments it
        completed and the bytes not synced yet; None if the spool of one of its members
        is gone meanwhile (its site reported failure)."""
        path, layout, base = self.early_path, self.layout, self.base_path
        inputs = [Spool(m.task_id, m.weight) for m in early.members]
        sources = self.sources(inputs)
        total, chunk_bytes, segment_bytes = early.total_weight, self.chunk_bytes, self.segment_bytes
        try:
            return await run_stoppable(
                self._aggregator,
                lambda stop: eager.write_step(
                    path,
                    layout,
                    sources,
                    total,
                    tensors,
                    early,
                    segment_bytes,
                    chunk_bytes,
                    stop,
                    base=base,
                ),
            )
        except FileNotFoundError as exc:
            if str(exc.filename) in {str(s.path) for s in sources}:
                return None
            raise storage_error(exc, f"global model of round {self.rnd}", path, "write") from exc
        except OSError as exc:
            raise storage_error(exc, f"global model of round {self.rnd}", path, "write") from exc

    async def finish_early(self, digests: dict[int, str]) -> Manifest:
        """Sync the early aggregate, hash what it lacks, and make it the round's model."""
        out = self.model_path
        with on_disk(f"global model of round {self.rnd}", out, "write"):
            return await asyncio.get_running_loop().run_in_executor(
                self._aggregator,
                functools.partial(
                    eager.finish, self.early_path, self.layout, self.segment_bytes, digests, out
                ),
            )

    async def aggregate(self, inputs: tuple[Input, ...], total_weight: float) -> Manifest:
        """The next global model from the spools and accumulators on record."""
        out, sources, layout = self.model_path, self.sources(inputs), self.layout
        segment_bytes, chunk_bytes, base = self.segment_bytes, self.chunk_bytes, self.base_path
        with on_disk(f"global model of round {self.rnd}", out, "write"):
            return await run_stoppable(
                self._aggregator,
                lambda stop: aggregate.finalize(
                    sources, layout, total_weight, out, segment_bytes, chunk_bytes, stop, base=base
                ),
            )
