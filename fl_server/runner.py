"""Runs jobs: prepares the initial model, issues tasks, folds updates, closes rounds.

One coroutine per active job, owned by ``JobRunner.run`` (a TaskGroup). Everything the
job decides comes from ``controller.decide_round`` over the state in SQLite, so a
restarted server resumes a job exactly where its last committed transaction left it:
finished rounds are never redone, folded updates never refolded, committed updates
never lost. HTTP handlers change state and ``poke`` the job; the job loop re-reads.

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
import functools
import logging
import shutil
import time
import uuid
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

from common import logctx
from common.config import JobConfig, ServerConfig
from common.errors import Conflict, FLError
from common.recycle import FilePool
from common.storage import on_disk, storage_error
from common.tensorfile import Layout, Manifest
from common.wire import JobState, TaskState
from fl_server import aggregate, eager
from fl_server.aggregate import Source
from fl_server.controller import (
    TERMINAL_JOB_STATES,
    Action,
    RoundState,
    TaskView,
    count_joinable,
    decide_round,
    is_alive,
    may_take_part,
)
from fl_server.modelgen import prepare_initial
from fl_server.state import StateDB, TaskRow
from fl_server.threads import run_stoppable
from fl_server.workspace import Workspace

log = logging.getLogger("fl_server.runner")
IDLE_RECHECK_S = 5.0
CLIENT_WAIT_RECHECK_S = 0.5


# a job that ended without finishing: nothing of its unfinished rounds is kept
UNFINISHED_JOB_STATES = frozenset({JobState.ABORTED, JobState.FAILED})


def _retire(pool: FilePool, paths: Iterable[Path]) -> None:
    for path in paths:
        pool.retire(path)


def _view(t: TaskRow) -> TaskView:
    return TaskView(t.task_id, t.client, t.state, t.last_progress, t.folded)


class JobRunner:
    def __init__(self, cfg: ServerConfig, ws: Workspace, db: StateDB) -> None:
        self.cfg = cfg
        self.ws = ws
        self.db = db
        self._wake: dict[str, asyncio.Event] = {}
        self._drives: dict[str, asyncio.Task[None]] = {}
        self._started: asyncio.Queue[str] = asyncio.Queue()
        self._issue_lock = asyncio.Lock()
        self.tasks_changed = asyncio.Condition()
        self._manifests: dict[tuple[str, int], Manifest] = {}
        self._configs: dict[str, JobConfig] = {}
        # the weights sites declare on their update's segments, by task, and the early
        # aggregate of each open round (see fl_server.eager); both in memory only: after
        # a restart the sites declare again and the early work starts over
        self._declared: dict[str, float] = {}
        self._eager: dict[tuple[str, int], eager.EagerRound] = {}
        self._cleanups: set[asyncio.Future[None]] = set()
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

    async def submit(self, cfg: JobConfig) -> str:
        job_id = uuid.uuid4().hex[:12]
        await self.db.run(self.db.insert_job, job_id, cfg.name, cfg.model_dump_json(), time.time())
        self._started.put_nowait(job_id)
        log.info("job %s (%s) submitted: %d rounds", job_id, cfg.name, cfg.num_rounds)
        return job_id

    async def abort(self, job_id: str) -> None:
        """Abort the job; ``Conflict`` naming its state if it has already ended."""
        await self.db.run(
            self.db.set_job_state, job_id, JobState.ABORTED, "aborted by admin", time.time()
        )
        drive = self._drives.get(job_id)
        if drive is not None:
            drive.cancel()  # long work in progress stops within one chunk
        self.poke(job_id)
        log.info("job %s aborted by admin", job_id)

    async def job_config(self, job_id: str) -> JobConfig:
        cfg = self._configs.get(job_id)
        if cfg is None:
            job = await self.db.run(self.db.get_job, job_id)
            cfg = JobConfig.model_validate_json(job.config)
            self._configs[job_id] = cfg
        return cfg

    async def manifest(self, job_id: str, rnd: int) -> Manifest:
        key = (job_id, rnd)
        man = self._manifests.get(key)
        if man is None:
            man = await asyncio.to_thread(self.ws.load_manifest, job_id, rnd)
            if man is None:
                raise Conflict(f"job {job_id} has no global model for round {rnd} yet")
            self._manifests[key] = man
        return man

    async def task_for(self, client: str) -> TaskRow | None:
        """The client's current task: one it already holds, or a new one in an open round."""
        async with self._issue_lock:
            for t in await self.db.run(self.db.assigned_tasks_of, client):
                rnd = await self.db.run(self.db.get_round, t.job_id, t.round)
                held = await self.db.run(self.db.get_job, t.job_id)
                if (
                    rnd is not None
                    and rnd.state is RoundState.OPEN
                    and held.state is JobState.RUNNING
                ):
                    return t
            for job in await self.db.run(self.db.list_jobs):
                if job.state is not JobState.RUNNING:
                    continue
                r = job.round_done + 1
                rnd = await self.db.run(self.db.get_round, job.job_id, r)
                if rnd is None or rnd.state is not RoundState.OPEN:
                    continue
                cfg = await self.job_config(job.job_id)
                views = [_view(t) for t in await self.db.run(self.db.round_tasks, job.job_id, r)]
                if not may_take_part(client, cfg.clients, views):
                    continue
                task_id = uuid.uuid4().hex[:16]
                now = time.time()
                if not await self.db.run(self.db.create_task, task_id, job.job_id, r, client, now):
                    continue  # the round began closing, or the job ended, meanwhile
                ids = logctx.ids(job=job.job_id, round=r, client=client, task=task_id)
                log.info(
                    "job %s round %d: task %s issued to %s",
                    job.job_id,
                    r,
                    task_id,
                    client,
                    extra=ids,
                )
                return await self.db.run(self.db.get_task, task_id)
        return None

    # the job loops
    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for job in await self.db.run(self.db.list_jobs):
                    if job.state in UNFINISHED_JOB_STATES:
                        await self._end_job(job.job_id)  # stopped before it was done
                    if job.state not in TERMINAL_JOB_STATES:
                        log.info("resuming job %s at round %d", job.job_id, job.round_done + 1)
                        tg.create_task(self._run_job(job.job_id))
                while True:
                    job_id = await self._started.get()
                    tg.create_task(self._run_job(job_id))
        finally:
            # every step in it was waited for (run_stoppable): its thread is idle
            self._aggregator.shutdown(wait=False, cancel_futures=True)

    async def _notify_tasks(self) -> None:
        async with self.tasks_changed:
            self.tasks_changed.notify_all()

    async def _set_state(self, job_id: str, state: JobState, reason: str | None = None) -> bool:
        """Move the job on; False (and a log line) if it was moved elsewhere meanwhile
        (an admin's abort): the write is conditional, see ``StateDB.set_job_state``."""
        try:
            await self.db.run(self.db.set_job_state, job_id, state, reason, time.time())
        except Conflict as err:
            log.info("job %s: not %s: %s", job_id, state.value, err.message)
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
                await self._fail(job_id, err.message)
            except Exception as exc:
                log.exception("job %s failed on an internal error", job_id)
                await self._fail(job_id, f"internal error: {exc!r} (see server log)")
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
        for key in [k for k in self._eager if k[0] == job_id]:
            del self._eager[key]  # its file goes with the rounds' folders below
        open_ids = [t.task_id for t in tasks if t.state is TaskState.ASSIGNED]
        if open_ids:
            await self.db.run(self.db.expire_tasks, open_ids, f"job {job.state.value}")
        await asyncio.to_thread(shutil.rmtree, self.ws.rounds_dir(job_id), True)

    async def _fail(self, job_id: str, reason: str) -> None:
        with contextlib.suppress(Conflict):  # it ended otherwise meanwhile
            await self.db.run(self.db.set_job_state, job_id, JobState.FAILED, reason, time.time())

    async def _drive_job(self, job_id: str) -> None:
        cfg = await self.job_config(job_id)
        job = await self.db.run(self.db.get_job, job_id)
        if job.state is JobState.PENDING:
            man = await asyncio.to_thread(self.ws.load_manifest, job_id, 0)
            if man is None:
                log.info("job %s: preparing the initial model", job_id)
                path = self.ws.model_path(job_id, 0)
                segment_bytes = self.cfg.segment_bytes
                with on_disk("initial model", path, "write"):
                    man = await run_stoppable(
                        None, lambda stop: prepare_initial(cfg.model, path, segment_bytes, stop)
                    )
                    await asyncio.to_thread(self.ws.save_manifest, job_id, 0, man)
            await self.db.run(self.db.set_model_bytes, job_id, man.file_size)
            if not await self._set_state(job_id, JobState.RUNNING):
                return
            log.info("job %s running: model of %d bytes", job_id, man.file_size)
        while True:
            job = await self.db.run(self.db.get_job, job_id)
            if job.state is not JobState.RUNNING:
                return
            rnd = job.round_done + 1
            if rnd > cfg.num_rounds:
                if await self._set_state(job_id, JobState.FINISHED):
                    log.info("job %s finished after %d rounds", job_id, cfg.num_rounds)
                return
            fresh = await self.db.run(self.db.get_round, job_id, rnd) is None
            if fresh and not await self._wait_for_clients(job_id, cfg):
                return
            await self.db.run(self.db.open_round, job_id, rnd, time.time())
            await self._notify_tasks()
            await self._drive_round(job_id, cfg, rnd)

    async def _alive_clients(self, cfg: JobConfig) -> list[str]:
        now = time.time()
        return [
            c.name
            for c in await self.db.run(self.db.list_clients)
            if is_alive(c.last_seen, now, self.cfg.client_gone_after_s)
            and (cfg.clients is None or c.name in cfg.clients)
        ]

    async def _wait_for_clients(self, job_id: str, cfg: JobConfig) -> bool:
        """Hold the round until ``min_clients`` admitted sites are connected."""
        wake = self._wake[job_id]
        started = time.monotonic()
        logged = False
        while len(await self._alive_clients(cfg)) < cfg.min_clients:
            job = await self.db.run(self.db.get_job, job_id)
            if job.state is not JobState.RUNNING:
                return False
            waited = time.monotonic() - started
            if cfg.wait_for_clients_s is not None and waited > cfg.wait_for_clients_s:
                have = len(await self._alive_clients(cfg))
                await self._set_state(
                    job_id,
                    JobState.FAILED,
                    f"only {have} of min_clients={cfg.min_clients} sites connected within "
                    f"wait_for_clients_s={cfg.wait_for_clients_s:g} s",
                )
                return False
            if not logged:
                log.info("job %s: waiting for %d connected sites", job_id, cfg.min_clients)
                logged = True
            wake.clear()
            try:
                async with asyncio.timeout(CLIENT_WAIT_RECHECK_S):
                    await wake.wait()
            except TimeoutError:
                pass
        return True

    def _aggregate_sources(self, job_id: str, rnd: int, tasks: list[TaskRow]) -> list[Source]:
        """The files whose weighted sum is the round's aggregate so far (see aggregate)."""
        folded = [t for t in tasks if t.folded]
        if not folded:
            return []
        if len(folded) == 1:
            t = folded[0]
            assert t.num_samples is not None
            return [Source(self.ws.spool_path(job_id, rnd, t.task_id), float(t.num_samples))]
        return [Source(self.ws.accumulator_path(job_id, rnd, len(folded)), None)]

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _clean_round_dir(self, job_id: str, rnd: int, tasks: list[TaskRow]) -> None:
        """After a restart: drop half-written files, files no longer on record, and what
        is left of the folders of closed rounds."""
        with contextlib.suppress(FileNotFoundError):
            for d in self.ws.rounds_dir(job_id).iterdir():
                if d.name.isdigit() and int(d.name) < rnd:
                    shutil.rmtree(d, ignore_errors=True)
        keep = {s.path for s in self._aggregate_sources(job_id, rnd, tasks)}
        keep |= {
            self.ws.spool_path(job_id, rnd, t.task_id)
            for t in tasks
            if not t.folded and t.state in (TaskState.ASSIGNED, TaskState.COMMITTED)
        }
        rdir = self.ws.round_dir(job_id, rnd)
        for p in [*rdir.glob("*"), *rdir.glob("spool/*")]:
            if p.is_file() and p not in keep:
                p.unlink()

    def _retire_round_dir(self, job_id: str, rnd: int, keep: int) -> None:
        """Remove a closed round's folder; its spools and accumulators go to the pool,
        which keeps as many as the round had tasks: the next round needs about as many."""
        rdir = self.ws.round_dir(job_id, rnd)
        _retire(
            self.ws.spares, [p for p in [*rdir.glob("*"), *rdir.glob("spool/*")] if p.is_file()]
        )
        self.ws.spares.trim(keep)
        shutil.rmtree(rdir, ignore_errors=True)

    async def _drive_round(self, job_id: str, cfg: JobConfig, rnd: int) -> None:
        logctx.bind(round=rnd)
        tasks = await self.db.run(self.db.round_tasks, job_id, rnd)
        await asyncio.to_thread(self._clean_round_dir, job_id, rnd, tasks)
        layout = (await self.manifest(job_id, rnd - 1)).layout
        state = await self.db.run(self.db.get_round, job_id, rnd)
        if state is not None and state.state is RoundState.CLOSING:
            # the server stopped while aggregating: finish that, with the same tasks;
            # the round never takes new tasks again
            log.info("job %s round %d: closing again after a restart", job_id, rnd)
            await self._close(job_id, rnd, layout, tasks)
            return
        wake = self._wake[job_id]
        opened = time.monotonic()
        while True:
            wake.clear()
            job = await self.db.run(self.db.get_job, job_id)
            if job.state is not JobState.RUNNING:
                return  # its open tasks expire in _end_job
            tasks = await self.db.run(self.db.round_tasks, job_id, rnd)
            unfolded = [t for t in tasks if t.state is TaskState.COMMITTED and not t.folded]
            now = time.time()
            views = [_view(t) for t in tasks]
            alive = [
                c.name
                for c in await self.db.run(self.db.list_clients)
                if is_alive(c.last_seen, now, self.cfg.client_gone_after_s)
            ]
            decision = decide_round(
                views,
                min_clients=cfg.min_clients,
                train_timeout=cfg.train_timeout,
                now=now,
                joinable=count_joinable(alive, cfg.clients, views),
            )
            if decision.expire:
                await self.db.run(
                    self.db.expire_tasks, list(decision.expire), "no result within train_timeout"
                )
                for tid in decision.expire:
                    ids = logctx.ids(task=tid)
                    log.warning("job %s round %d: task %s expired", job_id, rnd, tid, extra=ids)
            if decision.action is Action.CLOSE:
                # From here on no task is issued, committed or rejected in this round; the
                # tasks read after that are exactly the ones the aggregate is made of (a
                # task issued since the decision is expired by close_round).
                await self.db.run(self.db.begin_closing, job_id, rnd)
                tasks = await self.db.run(self.db.round_tasks, job_id, rnd)
                await self._close(job_id, rnd, layout, tasks)
                return
            if decision.action is Action.FAIL:
                assert decision.reason is not None
                reason = f"round {rnd}: {decision.reason}"
                if await self._set_state(job_id, JobState.FAILED, reason):
                    log.error("job %s round %d failed: %s", job_id, rnd, decision.reason)
                return
            members = eager.members_of(tasks, self._declared)
            if members is None:
                # not known for now: what was written early may count updates that go
                # (or whose spools an accumulator replaces); start over when known
                await self._drop_eager(job_id, rnd)
                if unfolded:
                    # fold in time, while other clients are still uploading
                    await self._fold(job_id, rnd, unfolded[0], layout, tasks)
                    continue
            elif await self._eager_step(job_id, rnd, layout, members):
                continue  # more may be ready already: look again without waiting
            if (
                cfg.wait_for_clients_s is not None
                and not any(t.state is TaskState.ASSIGNED for t in tasks)
                and time.monotonic() - opened > cfg.wait_for_clients_s
            ):
                have = sum(t.state is TaskState.COMMITTED for t in tasks)
                await self._set_state(
                    job_id,
                    JobState.FAILED,
                    f"round {rnd}: only {have} of min_clients={cfg.min_clients} clients took "
                    f"part within wait_for_clients_s={cfg.wait_for_clients_s:g} s",
                )
                return
            timeout = IDLE_RECHECK_S
            if decision.wake_at is not None:
                timeout = min(timeout, max(0.05, decision.wake_at - time.time()))
            try:
                async with asyncio.timeout(timeout):
                    await wake.wait()
            except TimeoutError:
                pass

    async def _eager_step(
        self, job_id: str, rnd: int, layout: Layout, members: tuple[eager.Member, ...]
    ) -> bool:
        """Average the next tensors every update holds into the early aggregate; False
        when there are none yet. A different set of members starts it over."""
        key = (job_id, rnd)
        path = self.ws.eager_path(job_id, rnd)
        state = self._eager.get(key)
        if state is None or state.members != members:
            if state is not None:
                log.info(
                    "job %s round %d: the updates it counts changed; early aggregate restarted",
                    job_id,
                    rnd,
                )
            await asyncio.to_thread(path.unlink, True)
            state = self._eager[key] = eager.EagerRound(members)
        segment_bytes = (await self.manifest(job_id, rnd - 1)).segment_bytes
        held = [set(await self.db.run(self.db.segments_of, m.task_id)) for m in members]
        ready = eager.ready_tensors(layout, segment_bytes, held, state.done)
        if not ready:
            return False
        step = eager.next_step(layout, ready)
        if not await self._write_eager(job_id, rnd, layout, state, step):
            await self._drop_eager(job_id, rnd)
        elif len(state.done) == len(layout.tensors):
            log.info(
                "job %s round %d: all %d tensors averaged while updates arrive; the commits "
                "decide whether this is the next global model",
                job_id,
                rnd,
                len(layout.tensors),
            )
        return True

    async def _drop_eager(self, job_id: str, rnd: int) -> None:
        if self._eager.pop((job_id, rnd), None) is not None:
            await asyncio.to_thread(self.ws.eager_path(job_id, rnd).unlink, True)

    async def _write_eager(
        self, job_id: str, rnd: int, layout: Layout, state: eager.EagerRound, step: list[int]
    ) -> bool:
        """Write ``step`` into the early aggregate; False if the spool of one of its
        members is gone meanwhile (its site reported failure): then it counts a task
        that is no longer part of the round."""
        path = self.ws.eager_path(job_id, rnd)
        sources = [
            Source(self.ws.spool_path(job_id, rnd, m.task_id), m.weight) for m in state.members
        ]
        total, chunk_bytes = state.total_weight, self._chunk_bytes
        segment_bytes = self.cfg.segment_bytes
        try:
            digests = await run_stoppable(
                self._aggregator,
                lambda stop: eager.write_step(
                    path, layout, sources, total, step, state, segment_bytes, chunk_bytes, stop
                ),
            )
        except FileNotFoundError as exc:
            if str(exc.filename) in {str(s.path) for s in sources}:
                return False
            raise storage_error(exc, f"global model of round {rnd}", path, "write") from exc
        except OSError as exc:
            raise storage_error(exc, f"global model of round {rnd}", path, "write") from exc
        state.done.update(step)
        state.digests.update(digests)
        return True

    async def _finish_eager(
        self, job_id: str, rnd: int, layout: Layout, tasks: list[TaskRow]
    ) -> tuple[Manifest, int] | None:
        """The next global model from the early aggregate, if it counts exactly the
        committed updates (writing the tensors still missing), with the number of
        tensors written early; None if it does not, and then it is gone."""
        state = self._eager.pop((job_id, rnd), None)
        path = self.ws.eager_path(job_id, rnd)
        if state is None or state.members != eager.committed_members(tasks):
            await asyncio.to_thread(path.unlink, True)
            return None
        early = len(state.done)
        rest = [i for i in range(len(layout.tensors)) if i not in state.done]
        # also with nothing left: the step makes the file if no step did yet
        if not await self._write_eager(job_id, rnd, layout, state, rest):
            await asyncio.to_thread(path.unlink, True)
            return None
        out = self.ws.model_path(job_id, rnd)
        segment_bytes = self.cfg.segment_bytes
        with on_disk(f"global model of round {rnd}", out, "write"):
            man = await asyncio.get_running_loop().run_in_executor(
                self._aggregator,
                functools.partial(eager.finish, path, layout, segment_bytes, state.digests, out),
            )
        return man, early

    async def _fold(
        self, job_id: str, rnd: int, task: TaskRow, layout: Layout, tasks: list[TaskRow]
    ) -> None:
        assert task.num_samples is not None
        weight = float(task.num_samples)
        before = self._aggregate_sources(job_id, rnd, tasks)
        spool = self.ws.spool_path(job_id, rnd, task.task_id)
        count = sum(t.folded for t in tasks) + 1
        started = time.monotonic()
        if before:
            out = self.ws.accumulator_path(job_id, rnd, count)
            sources = [*before, Source(spool, weight)]
            chunk_bytes = self._chunk_bytes
            with on_disk(f"accumulator for task {task.task_id}", out, "write"):
                await run_stoppable(
                    self._aggregator,
                    lambda stop: aggregate.fold(sources, layout, out, chunk_bytes, stop),
                )
        await self.db.run(self.db.mark_folded, task.task_id, job_id, rnd, count, weight)
        if before:
            # files of a model's size: the next ones are written over them
            await asyncio.to_thread(_retire, self.ws.spares, [*(s.path for s in before), spool])
        log.info(
            "job %s round %d: update of %s (task %s, weight %g) folded in %.2f s",
            job_id,
            rnd,
            task.client,
            task.task_id,
            weight,
            time.monotonic() - started,
            extra=logctx.ids(client=task.client, task=task.task_id),
        )

    @property
    def _chunk_bytes(self) -> int:
        return self.cfg.aggregation_chunk_mib * 1024 * 1024

    async def _close(self, job_id: str, rnd: int, layout: Layout, tasks: list[TaskRow]) -> None:
        started = time.monotonic()
        made = await self._finish_eager(job_id, rnd, layout, tasks)
        if made is None:
            man = await self._aggregate(job_id, rnd, layout, tasks)
            how = "from the spools"
        else:
            man, early = made
            how = f"{early} of {len(layout.tensors)} tensors while updates arrived"
        out = self.ws.model_path(job_id, rnd)
        with on_disk(f"global model of round {rnd}", out, "write"):
            await asyncio.to_thread(self.ws.save_manifest, job_id, rnd, man)
        await self.db.run(self.db.close_round, job_id, rnd, [], time.time())
        # a round's folder holds a model-size file per update: they go to the pool for the
        # next round's spools to be written over (what a crash leaves, the next round's
        # start removes)
        await asyncio.to_thread(self._retire_round_dir, job_id, rnd, len(tasks))
        for t in tasks:
            self._declared.pop(t.task_id, None)
        log.info(
            "job %s round %d closed: %d updates, total weight %g, aggregated in %.2f s (%s)",
            job_id,
            rnd,
            sum(t.state is TaskState.COMMITTED for t in tasks),
            sum(float(t.num_samples or 0) for t in tasks if t.state is TaskState.COMMITTED),
            time.monotonic() - started,
            how,
        )

    async def _aggregate(
        self, job_id: str, rnd: int, layout: Layout, tasks: list[TaskRow]
    ) -> Manifest:
        """The next global model from the spools and accumulators on record."""
        sources = self._aggregate_sources(job_id, rnd, tasks)
        total = sum(float(t.num_samples or 0) for t in tasks if t.folded)
        for t in tasks:
            if t.state is TaskState.COMMITTED and not t.folded:
                assert t.num_samples is not None
                sources.append(
                    Source(self.ws.spool_path(job_id, rnd, t.task_id), float(t.num_samples))
                )
                total += t.num_samples
        out = self.ws.model_path(job_id, rnd)
        segment_bytes, chunk_bytes = self.cfg.segment_bytes, self._chunk_bytes
        with on_disk(f"global model of round {rnd}", out, "write"):
            return await run_stoppable(
                self._aggregator,
                lambda stop: aggregate.finalize(
                    sources, layout, total, out, segment_bytes, chunk_bytes, stop
                ),
            )
