"""Runs jobs: carries out what the round core decides, against disk, database, threads.

One coroutine per active job, owned by ``JobRunner.run`` (a TaskGroup). What a round
does next is decided by ``fl_server.core.round.RoundCore`` from the state in SQLite, so
a restarted server resumes a job exactly where its last committed transaction left it:
finished rounds are never redone, folded updates never refolded, committed updates
never lost. HTTP handlers change state and ``poke`` the job; the job loop reads the
record again, feeds the core what changed and carries out the effects it answers with.

Long work (the initial model, folds, the next global model) runs in threads through
``fl_server.threads.run_stoppable``: cancelling the job's loop, because the server is
stopping or an admin aborted the job, stops it within one chunk and removes its partial
file. A job that ends without finishing (aborted, failed) gives up its open tasks and
the files of its unfinished rounds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import shutil
import time

from common import logctx
from common.config import ServerConfig
from common.errors import Conflict, FLError
from common.storage import on_disk
from common.wire import JobState, TaskState
from fl_server.core import disk, rules
from fl_server.core.transitions import TERMINAL_JOB_STATES, JobEvent
from fl_server.jobs import JobBook
from fl_server.modelgen import prepare_initial
from fl_server.round_driver import RoundDriver
from fl_server.state import StateDB
from fl_server.threads import run_stoppable
from fl_server.workspace import Workspace

log = logging.getLogger("fl_server.runner")
CLIENT_WAIT_RECHECK_S = 0.5

# a job that ended without finishing: nothing of its unfinished rounds is kept
UNFINISHED_JOB_STATES = frozenset({JobState.ABORTED, JobState.FAILED})


class JobRunner(JobBook):
    """The job loops; task issuing and the job's values are ``JobBook``'s."""

    def __init__(self, cfg: ServerConfig, ws: Workspace, db: StateDB) -> None:
        super().__init__(cfg, ws, db)
        self._wake: dict[str, asyncio.Event] = {}
        self._drives: dict[str, asyncio.Task[None]] = {}
        # the weights sites declare on their update's segments, by task: in memory
        # only; after a restart the sites declare again and the early work starts over
        self._declared: dict[str, float] = {}
        # aggregation work (early steps, folds, closes) in one thread: its chunk buffers
        # then live in one malloc arena, not in one per worker thread that ran a step
        self._aggregator = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fl-aggregate"
        )

    # called by handlers
    def poke(self, job_id: str) -> None:
        ev = self._wake.get(job_id)
        if ev is not None:
            ev.set()

    def declare_weight(self, task_id: str, num_samples: int) -> None:
        self._declared[task_id] = float(num_samples)

    async def abort(self, job_id: str) -> None:
        """Abort the job; ``Conflict`` naming its state if it has already ended."""
        await self.db.run(
            self.db.set_job_state, job_id, JobEvent.ABORT, "aborted by admin", time.time()
        )
        drive = self._drives.get(job_id)
        if drive is not None:
            drive.cancel()  # long work in progress stops within one chunk
        self.poke(job_id)
        log.info("job %s aborted by admin", job_id)

    async def delete(self, job_id: str) -> None:
        """Delete an ended job's records and files (see ``Workspace.delete_job``)."""
        await asyncio.to_thread(self.ws.delete_job, job_id, lambda: self.db.delete_job(job_id))
        self.forget(job_id)
        log.info("job %s deleted by admin", job_id)

    async def _drop_models(self, job_id: str, done: int) -> None:
        """The models the job's ``keep:`` no longer keeps once round ``done`` closed."""
        keep = (await self.job_config(job_id)).keep
        gone = disk.dropped(keep, done, range(done))
        for rnd in gone:
            self.forget_manifest(job_id, rnd)
        await asyncio.to_thread(self.ws.drop_models, job_id, gone)

    # the job loops
    async def run(self) -> None:
        try:
            await asyncio.to_thread(self.ws.remove_leftovers)
            async with asyncio.TaskGroup() as tg:
                for job in await self.db.run(self.db.list_jobs):
                    if job.state in UNFINISHED_JOB_STATES:
                        await self._end_job(job.job_id)  # stopped before it was done
                    if job.state not in TERMINAL_JOB_STATES:
                        log.info("resuming job %s at round %d", job.job_id, job.round_done + 1)
                        tg.create_task(self._run_job(job.job_id))
                while True:
                    job_id = await self.started.get()
                    tg.create_task(self._run_job(job_id))
        finally:
            # every step in it was waited for (run_stoppable): its thread is idle
            self._aggregator.shutdown(wait=False, cancel_futures=True)

    async def _move(self, job_id: str, event: JobEvent, reason: str | None = None) -> bool:
        """Move the job on; False (and a log line) if it was moved elsewhere meanwhile
        (an admin's abort): the write is conditional, see ``StateDB.set_job_state``."""
        try:
            await self.db.run(self.db.set_job_state, job_id, event, reason, time.time())
        except Conflict as err:
            log.info("job %s: cannot %s: %s", job_id, event.value, err.message)
            return False
        return True

    async def _run_job(self, job_id: str) -> None:
        self._wake[job_id] = asyncio.Event()
        logctx.bind(job=job_id)  # this job's own task: every line it logs names the job
        # a task of its own, that abort() can cancel without stopping the server
        drive = asyncio.create_task(self._drive_job(job_id), name=f"job {job_id}")
        self._drives[job_id] = drive
        try:
            try:
                await drive
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise  # the server is stopping: the job resumes at the next start
                log.info("job %s: work in progress stopped by its abort", job_id)
            except FLError as err:
                log.error("job %s failed: %s", job_id, err.message)
                await self._move(job_id, JobEvent.FAIL, err.message)
            except Exception as exc:
                log.exception("job %s failed on an internal error", job_id)
                await self._move(job_id, JobEvent.FAIL, f"internal error: {exc!r} (see log)")
            await self._end_job(job_id)
        finally:
            self._drives.pop(job_id, None)
            self._wake.pop(job_id, None)

    async def _end_job(self, job_id: str) -> None:
        """A job that ended without finishing: its open tasks expire, and the files of its
        unfinished rounds (spools, accumulators: up to a model per site) are removed.
        The spare files go too once no job runs."""
        if all(j == job_id for j in self._drives):  # no other job writes over them
            await asyncio.to_thread(self.ws.spares.clear)
        job = await self.db.run(self.db.get_job, job_id)
        if job.state not in UNFINISHED_JOB_STATES:
            return
        tasks = await self.db.run(self.db.job_tasks, job_id)
        for t in tasks:
            self._declared.pop(t.task_id, None)
        open_ids = [t.task_id for t in tasks if t.state is TaskState.ASSIGNED]
        if open_ids:
            await self.db.run(self.db.expire_tasks, open_ids, f"job {job.state.value}")
        await asyncio.to_thread(shutil.rmtree, self.ws.rounds_dir(job_id), True)

    async def _drive_job(self, job_id: str) -> None:
        cfg = await self.job_config(job_id)
        job = await self.db.run(self.db.get_job, job_id)
        if job.state is JobState.PENDING:
            man = await asyncio.to_thread(self.ws.load_manifest, job_id, 0)
            if man is None:
                log.info("job %s: preparing the initial model", job_id)
                path, segment_bytes = self.ws.model_path(job_id, 0), self.cfg.segment_bytes
                dirs, staged = self.cfg.allowed_model_dirs, self.staging
                ckpt = self.ws.checkpoint_path(job_id)
                with on_disk("initial model", path, "write"):
                    man = await run_stoppable(
                        None,
                        lambda stop: prepare_initial(
                            cfg.model, path, segment_bytes, stop, dirs, ckpt, staged
                        ),
                    )
                    await asyncio.to_thread(self.ws.save_manifest, job_id, 0, man)
            await self.release_upload(job_id, cfg.model)  # also after a restart right here
            await self.db.run(self.db.set_model_bytes, job_id, man.file_size)
            if not await self._move(job_id, JobEvent.START):
                return
            log.info("job %s running: model of %d bytes", job_id, man.file_size)
        while True:
            job = await self.db.run(self.db.get_job, job_id)
            if job.state is not JobState.RUNNING:
                return
            rnd = job.round_done + 1
            if rnd > cfg.num_rounds:
                if await self._move(job_id, JobEvent.FINISH):
                    log.info("job %s finished after %d rounds", job_id, cfg.num_rounds)
                return
            fresh = await self.db.run(self.db.get_round, job_id, rnd) is None
            if fresh and not await self._wait_for_clients(job_id):
                return
            await self.db.run(self.db.open_round, job_id, rnd, time.time())
            await self.notify_tasks()
            driver = RoundDriver(
                self,
                job_id,
                rnd,
                declared=self._declared,
                aggregator=self._aggregator,
                wake=self._wake[job_id],
                fail=lambda reason: self._move(job_id, JobEvent.FAIL, reason),
            )
            if not await driver.run():
                return
            await self._drop_models(job_id, rnd)

    async def _wait_for_clients(self, job_id: str) -> bool:
        """Hold the round until ``min_clients`` admitted sites are connected."""
        cfg = await self.job_config(job_id)
        wake = self._wake[job_id]
        started = time.monotonic()
        logged = False
        while True:
            job = await self.db.run(self.db.get_job, job_id)
            if job.state is not JobState.RUNNING:
                return False
            decision = rules.decide_start(
                connected=len(await self.alive_clients(cfg.clients)),
                min_clients=cfg.min_clients,
                waited_s=time.monotonic() - started,
                wait_for_clients_s=cfg.wait_for_clients_s,
            )
            if decision.action is rules.Action.GO:
                return True
            if decision.action is rules.Action.FAIL:
                await self._move(job_id, JobEvent.FAIL, decision.reason)
                return False
            if not logged:
                log.info("job %s: waiting for %d connected sites", job_id, cfg.min_clients)
                logged = True
            wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLIENT_WAIT_RECHECK_S):
                    await wake.wait()
