"""The jobs as the handlers see them: submitting, their settings and models, issuing tasks.

A site that polls gets the task it already holds in an open round, or a new one in the
first open round of a running job that admits it (``rules.may_take_part``). Issuing is
serialized, and the task is created in one conditional transaction, so a round that
began closing or a job that ended meanwhile issues nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Collection

from common import logctx
from common.config import JobConfig, ModelSpec, ServerConfig, UploadedModel
from common.errors import Conflict
from common.tensorfile import Manifest
from common.wire import JobState
from fl_server.core import rules
from fl_server.core.transitions import RoundState
from fl_server.staging import Staging
from fl_server.state import StateDB, TaskRow
from fl_server.workspace import Workspace

log = logging.getLogger("fl_server.runner")


class JobBook:
    def __init__(self, cfg: ServerConfig, ws: Workspace, db: StateDB) -> None:
        self.cfg = cfg
        self.ws = ws
        self.db = db
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self.tasks_changed = asyncio.Condition()
        self._issue_lock = asyncio.Lock()
        self._manifests: dict[tuple[str, int], Manifest] = {}
        self._configs: dict[str, JobConfig] = {}
        self.staging = Staging(ws.uploads_dir)  # models admins upload for their jobs

    async def submit(self, cfg: JobConfig) -> str:
        job_id = uuid.uuid4().hex[:12]
        await self.db.run(self.db.insert_job, job_id, cfg.name, cfg.model_dump_json(), time.time())
        self.started.put_nowait(job_id)
        log.info("job %s (%s) submitted: %d rounds", job_id, cfg.name, cfg.num_rounds)
        return job_id

    async def release_upload(self, job_id: str, model: ModelSpec) -> None:
        """Remove the staged upload ``job_id`` prepared its model from, unless another job
        still waits to prepare from it (a second ``submit`` of the same model)."""
        if not isinstance(model, UploadedModel):
            return
        for job in await self.db.run(self.db.list_jobs):
            if job.job_id == job_id or job.state is not JobState.PENDING:
                continue
            other = (await self.job_config(job.job_id)).model
            same = isinstance(other, UploadedModel) and other.upload_id == model.upload_id
            if same and await asyncio.to_thread(self.ws.load_manifest, job.job_id, 0) is None:
                return
        await asyncio.to_thread(self.staging.remove, model.upload_id)
        log.info("job %s: staged upload %s removed", job_id, model.upload_id)

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

    def forget_manifest(self, job_id: str, rnd: int) -> None:
        self._manifests.pop((job_id, rnd), None)

    def forget(self, job_id: str) -> None:
        """Drop what is cached of a deleted job."""
        self._configs.pop(job_id, None)
        for key in [k for k in self._manifests if k[0] == job_id]:
            del self._manifests[key]

    async def notify_tasks(self) -> None:
        async with self.tasks_changed:
            self.tasks_changed.notify_all()

    async def alive_clients(self, admitted: Collection[str] | None) -> list[str]:
        """The sites heard from lately (of ``admitted``, unless None)."""
        now = time.time()
        return [
            c.name
            for c in await self.db.run(self.db.list_clients)
            if rules.is_alive(c.last_seen, now, self.cfg.client_gone_after_s)
            and (admitted is None or c.name in admitted)
        ]

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
                views = [t.view() for t in await self.db.run(self.db.round_tasks, job.job_id, r)]
                if not rules.may_take_part(client, cfg.clients, views):
                    continue
                task_id = uuid.uuid4().hex[:16]
                if not await self.db.run(
                    self.db.create_task, task_id, job.job_id, r, client, time.time()
                ):
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
