"""Carrying out one round: the record fed to the round core, its effects done.

The loop: read the round's tasks (and the segments and weights of those still
uploading), feed what changed to ``RoundCore``, ask it what to do at ``now``, do it
(database writes, file work in ``RoundFiles``), feed back how it went, and wait when it
says so, or until a handler pokes the job. A round found closing after a restart is
closed again from the spools, with the same tasks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from common import logctx
from common.storage import on_disk
from common.tensorfile import Manifest
from common.wire import JobState, TaskState
from fl_server.core.round import RoundCore, RoundRules
from fl_server.core.round_events import (
    Aggregate,
    BeginClosing,
    CloseRound,
    ClosingBegun,
    EarlyLost,
    EarlyStep,
    EarlyWritten,
    Effect,
    ExpireTasks,
    Fail,
    Finalized,
    FinishEarly,
    Fold,
    Folded,
    RestartEarly,
    Tick,
    WakeAt,
)
from fl_server.core.transitions import RoundState
from fl_server.jobs import JobBook
from fl_server.round_files import RoundFiles

log = logging.getLogger("fl_server.runner")


class RoundDriver:
    """One round of one job, from its opening (or a restart) to its close."""

    def __init__(
        self,
        book: JobBook,
        job_id: str,
        rnd: int,
        *,
        declared: dict[str, float],
        aggregator: concurrent.futures.Executor,
        wake: asyncio.Event,
        fail: Callable[[str], Awaitable[bool]],
    ) -> None:
        self.book, self.db, self.ws = book, book.db, book.ws
        self.job_id, self.rnd = job_id, rnd
        self.declared = declared  # by task, from the handlers; shared with the runner
        self._aggregator = aggregator
        self._wake = wake
        self._fail = fail

    async def _start(self) -> None:
        cfg = await self.book.job_config(self.job_id)
        base = await self.book.manifest(self.job_id, self.rnd - 1)
        self.core = RoundCore(
            rnd=self.rnd,
            layout=base.layout,
            segment_bytes=base.segment_bytes,
            policy=RoundRules(
                min_clients=cfg.min_clients,
                train_timeout=cfg.train_timeout,
                wait_for_clients_s=cfg.wait_for_clients_s,
                clients=None if cfg.clients is None else tuple(cfg.clients),
            ),
            opened_at=time.time(),
        )
        self.files = RoundFiles(
            self.ws,
            self.job_id,
            self.rnd,
            base.layout,
            segment_bytes=self.book.cfg.segment_bytes,
            chunk_bytes=self.book.cfg.aggregation_chunk_mib * 1024 * 1024,
            aggregator=self._aggregator,
        )
        await self._catch_up()
        await asyncio.to_thread(self.files.clean, self.core.kept_files())
        record = await self.db.run(self.db.get_round, self.job_id, self.rnd)
        if record is not None and record.state is RoundState.CLOSING:
            # the server stopped while aggregating: finish that, with the same tasks;
            # the round never takes new tasks again
            log.info("job %s round %d: closing again after a restart", self.job_id, self.rnd)
            self.core.handle(ClosingBegun())

    async def _catch_up(self) -> None:
        """Feed the core what the record holds that it does not know yet."""
        rows = await self.db.run(self.db.round_tasks, self.job_id, self.rnd)
        held = {
            t.task_id: (await self.db.run(self.db.segments_of, t.task_id)).keys()
            for t in rows
            if t.state is TaskState.ASSIGNED
        }
        for event in self.core.catch_up([t.info() for t in rows], held, self.declared):
            self.core.handle(event)

    async def run(self) -> bool:
        """Run the round until it closes (True) or the job stops or fails (False)."""
        logctx.bind(round=self.rnd)
        await self._start()
        while True:
            self._wake.clear()
            job = await self.db.run(self.db.get_job, self.job_id)
            if job.state is not JobState.RUNNING:
                return False  # its open tasks expire when the job ends
            await self._catch_up()
            alive = tuple(await self.book.alive_clients(None))
            effects = self.core.handle(Tick(time.time(), alive))
            wake_at: float | None = None
            while effects:
                effect, *effects = effects
                if isinstance(effect, WakeAt):
                    wake_at = effect.at
                elif isinstance(effect, Fail):
                    if await self._fail(effect.reason):
                        log.error("job %s failed: %s", self.job_id, effect.reason)
                    return False
                elif isinstance(effect, CloseRound):
                    return True  # carried out with the model that made it (_close)
                else:
                    effects += await self._carry_out(effect)
            if wake_at is None:
                continue  # work was done: more may be ready already
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, wake_at - time.time())):
                    await self._wake.wait()

    async def _carry_out(self, effect: Effect) -> list[Effect]:
        """Do one effect; the effects the core answers the outcome with."""
        rnd = self.core.rnd
        match effect:
            case ExpireTasks(task_ids, reason):
                await self.db.run(self.db.expire_tasks, list(task_ids), reason)
                for tid in task_ids:
                    log.warning(
                        "job %s round %d: task %s expired",
                        self.job_id,
                        rnd,
                        tid,
                        extra=logctx.ids(task=tid),
                    )
            case Fold(task_id, client, weight, inputs, count):
                started = time.monotonic()
                await self.files.fold(inputs, count)
                await self.db.run(self.db.mark_folded, task_id)
                await self.files.retire_inputs(inputs)
                log.info(
                    "job %s round %d: update of %s (task %s, weight %g) folded in %.2f s",
                    self.job_id,
                    rnd,
                    client,
                    task_id,
                    weight,
                    time.monotonic() - started,
                    extra=logctx.ids(client=client, task=task_id),
                )
                return self.core.handle(Folded(task_id))
            case RestartEarly(_, replaced):
                if replaced:
                    log.info(
                        "job %s round %d: the updates it counts changed; early aggregate restarted",
                        self.job_id,
                        rnd,
                    )
                await self.files.drop_early()
            case EarlyStep(tensors, early):
                written = await self.files.early_step(tensors, early)
                if written is None:
                    await self.files.drop_early()
                    return self.core.handle(EarlyLost())
                self.core.handle(EarlyWritten(tensors, *written))
                if self.core.early is not None and len(self.core.early.done) == len(
                    self.core.layout.tensors
                ):
                    log.info(
                        "job %s round %d: all %d tensors averaged while updates arrive; the "
                        "commits decide whether this is the next global model",
                        self.job_id,
                        rnd,
                        len(self.core.layout.tensors),
                    )
            case BeginClosing():
                # From here on no task is issued, committed or rejected in this round; the
                # tasks read after that are exactly the ones the aggregate is made of (a
                # task issued since the decision is expired by close_round).
                await self.db.run(self.db.begin_closing, self.job_id, rnd, time.time())
                await self._catch_up()
                self.core.handle(ClosingBegun())
                return self.core.handle(Tick(time.time()))
            case FinishEarly(rest, early):
                started = time.monotonic()
                written = await self.files.early_step(rest, early)
                if written is None:
                    await self.files.drop_early()
                    self.core.handle(EarlyLost())
                    return self.core.handle(Tick(time.time()))
                man = await self.files.finish_early({**early.digests, **written[0]})
                return await self._close(man, len(early.done), started)
            case Aggregate(inputs, total_weight):
                started = time.monotonic()
                man = await self.files.aggregate(inputs, total_weight)
                return await self._close(man, None, started)
            case _:  # DropEarly
                await self.files.drop_early()
        return []

    async def _close(
        self,
        man: Manifest,
        early: int | None,
        started: float,
    ) -> list[Effect]:
        """The next global model is written: record it, close the round, advance the job."""
        rnd = self.core.rnd
        effects = self.core.handle(Finalized(early))
        [close] = [e for e in effects if isinstance(e, CloseRound)]
        with on_disk(f"global model of round {rnd}", self.files.model_path, "write"):
            await asyncio.to_thread(self.ws.save_manifest, self.job_id, rnd, man)
        await self.db.run(self.db.close_round, self.job_id, rnd, time.time())
        # a round's folder holds a model-size file per update: they go to the pool for the
        # next round's spools to be written over (what a crash leaves, the next round's
        # start removes)
        await asyncio.to_thread(self.files.retire, len(self.core.tasks))
        for task_id in self.core.tasks:
            self.declared.pop(task_id, None)
        log.info(
            "job %s round %d closed: %d updates, total weight %g, aggregated in %.2f s (%s)",
            self.job_id,
            rnd,
            close.updates,
            close.total_weight,
            time.monotonic() - started,
            close.how,
        )
        return effects
