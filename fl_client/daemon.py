"""The client daemon: heartbeat, pull a task, download, train, upload, commit, repeat.

Each task has a folder in the workspace holding what is done so far: the downloaded
model (``model.safetensors``, complete only once every segment verified), the update
and its manifest (``update.json``, written when training finished). A restarted daemon
gets the same task from the server and continues from the first step not yet done; the
transfers themselves resume segment by segment. Folders of other tasks are removed
when a new task starts: their rounds are over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import shutil
from pathlib import Path

from common import logctx
from common.config import ClientConfig
from common.errors import (
    Conflict,
    FLError,
    ModelFormatError,
    StorageError,
    TaskExpired,
    TransferError,
    UpdateRejected,
)
from common.modelio import ModelReader, ModelWriter
from common.tensorfile import Manifest
from common.wire import GET_TASK, HEARTBEAT, Heartbeat, Phase, Task, TaskReply
from fl_client.http import Api, make_session
from fl_client.metrics import ClientMetrics
from fl_client.progress_log import ProgressLogger
from fl_client.storage import is_disk_error, on_disk, storage_error
from fl_client.trainer import TrainContext, Trainer, TrainerFailed, TrainResult, load_trainer
from fl_client.transfer import (
    Interrupted,
    commit_update,
    download_model,
    report_failure,
    upload_update,
)

log = logging.getLogger("fl_client")
POLL_WAIT_S = 15.0


class Progress:
    """What the heartbeat reports: the phase and bytes of the current task.

    ``add`` is also the trainer's progress callback, called from its worker thread; when
    the daemon is stopping it raises ``Interrupted`` so that training ends promptly and
    its partial update is discarded (the task resumes by training again).
    """

    def __init__(self, stopping: asyncio.Event, logger: ProgressLogger) -> None:
        self.stopping = stopping
        self.logger = logger
        self.task_id: str | None = None
        self.phase = Phase.IDLE
        self.done = 0
        self.total = 0

    def start(self, task_id: str, phase: Phase, total: int) -> None:
        self.logger.phase(phase, self.done, total)
        self.task_id, self.phase, self.done, self.total = task_id, phase, 0, total

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.stopping.is_set() and self.phase is Phase.TRAINING:
            raise Interrupted("training stopped: the daemon is shutting down")

    def idle(self) -> None:
        self.logger.phase(Phase.IDLE, self.done, 0)
        self.task_id, self.phase, self.done, self.total = None, Phase.IDLE, 0, 0


def _train(
    trainer: Trainer, trainer_task: Task, model_path: Path, update_path: Path, ctx: TrainContext
) -> tuple[Manifest, TrainResult]:
    """Run the trainer; any failure of the plugin becomes a ``TrainerFailed`` to report."""
    man = trainer_task.manifest
    with on_disk("model", model_path, "open"):
        reader = ModelReader(model_path)
    with reader:
        if reader.layout != man.layout:
            raise ModelFormatError(f"{model_path} does not match the task's manifest")
        with on_disk("update", update_path, "create"):
            writer = ModelWriter(
                update_path, man.layout, segment_bytes=man.segment_bytes, durable=False
            )
        with writer:
            try:
                result = trainer.train(reader, writer, ctx)
            except (Interrupted, FLError):
                raise
            except Exception as exc:
                if is_disk_error(exc):  # the update's disk is full: not the plugin's fault
                    raise storage_error(exc, "update", update_path, "write") from exc
                raise TrainerFailed(
                    f"trainer {trainer_task.trainer.name!r} failed: {exc!r}"
                ) from exc
            with on_disk("update", update_path, "save"):
                update_man = writer.finish()
    if not isinstance(result, TrainResult) or result.num_samples < 1:
        raise TrainerFailed(
            f"trainer {trainer_task.trainer.name!r} must return TrainResult with num_samples >= 1"
        )
    return update_man, result


class ClientDaemon:
    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.stopping = asyncio.Event()
        self.progress = Progress(self.stopping, ProgressLogger(cfg.progress_log_s))
        self.metrics = ClientMetrics(self.progress)
        self.registered = asyncio.Event()  # set once the server has answered a heartbeat
        self.tasks_dir = cfg.workspace / "tasks"

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop``; then finish the segments in flight (bounded) and return."""
        await asyncio.to_thread(_make_dir, "workspace", self.tasks_dir)
        logctx.bind(client=self.cfg.name)
        async with make_session(
            identity=self.cfg.name, connections=self.cfg.transfer.window + 4, tls=self.cfg.tls
        ) as session:
            api = Api(session, self.cfg.server_url, self.cfg.timeouts)
            log.info("fl-client %s started; server %s", self.cfg.name, self.cfg.server_url)
            async with asyncio.TaskGroup() as tg:
                beat = tg.create_task(self._heartbeats(api))
                work = tg.create_task(self._work_loop(api))
                ticker = tg.create_task(self.progress.logger.run(self.progress))
                await stop.wait()
                log.info("fl-client %s stopping: finishing segments in flight", self.cfg.name)
                self.stopping.set()
                if self.progress.task_id is None:
                    work.cancel()  # idle in a long-poll: nothing to finish
                done, _ = await asyncio.wait([work], timeout=self.cfg.shutdown_timeout_s)
                if not done:
                    log.warning(
                        "segments still in flight after %g s; dropping them",
                        self.cfg.shutdown_timeout_s,
                    )
                work.cancel()
                beat.cancel()
                ticker.cancel()
            log.info("fl-client %s stopped", self.cfg.name)

    async def _heartbeats(self, api: Api) -> None:
        while True:
            p = self.progress
            hb = Heartbeat(task_id=p.task_id, phase=p.phase, bytes_done=p.done, bytes_total=p.total)
            try:
                await api.call("POST", HEARTBEAT.format(client=self.cfg.name), None, body=hb)
                self.registered.set()
            except FLError as err:
                log.debug("heartbeat failed: %s", err.message)
            await asyncio.sleep(self.cfg.heartbeat_interval_s)

    async def _work_loop(self, api: Api) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                reply = await api.call(
                    "GET",
                    GET_TASK.format(client=self.cfg.name),
                    TaskReply,
                    params={"wait": str(POLL_WAIT_S)},
                    wait_s=POLL_WAIT_S,
                )
                backoff = 0.5
            except FLError as err:
                log.warning(
                    "cannot reach the server (%s); retrying in %.1f s", err.message, backoff
                )
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(self.cfg.retry_backoff_max_s, backoff * 2)
                continue
            assert reply is not None
            if reply.task is None:
                await asyncio.sleep(reply.retry_after_s * random.uniform(0.5, 1.0))
                continue
            task_id = reply.task.task_id
            bound = logctx.bind(job=reply.task.job_id, round=reply.task.round, task=task_id)
            try:
                await self._do_task(api, reply.task)
            except Interrupted as exc:
                log.info("task %s paused: %s", task_id, exc)
                return
            except TaskExpired as err:
                log.warning("%s", err.message)
                await asyncio.to_thread(shutil.rmtree, self.tasks_dir / task_id, True)
            except (UpdateRejected, TrainerFailed, ModelFormatError) as err:
                log.error("task %s cannot be completed: %s", task_id, err.message)
                await self._give_up(api, task_id, err.message)
            except StorageError as err:
                log.error(
                    "task %s: this site's disk failed: %s; trying again in %.1f s (free space "
                    "or fix the disk under %s)",
                    task_id,
                    err.message,
                    self.cfg.retry_backoff_max_s,
                    self.cfg.workspace,
                )
                await asyncio.sleep(self.cfg.retry_backoff_max_s)
            except Conflict as err:
                log.warning("task %s: %s", task_id, err.message)
                await asyncio.sleep(backoff)
            except TransferError as err:
                log.warning("task %s interrupted: %s; will resume", reply.task.task_id, err.message)
                await asyncio.sleep(backoff)
            except FLError as err:
                log.error("task %s failed: %s", reply.task.task_id, err.message)
                await asyncio.sleep(self.cfg.retry_backoff_max_s)
            finally:
                self.progress.idle()
                logctx.reset(bound)

    async def _give_up(self, api: Api, task_id: str, reason: str) -> None:
        """Tell the server, so the round goes on without this site, and drop the task."""
        try:
            await report_failure(api, task_id, reason)
        except FLError as err:
            log.warning("could not report the failure of task %s: %s", task_id, err.message)
        await asyncio.to_thread(shutil.rmtree, self.tasks_dir / task_id, True)

    def _forget_other_tasks(self, keep: str) -> None:
        for d in self.tasks_dir.iterdir():
            if d.is_dir() and d.name != keep:
                shutil.rmtree(d, ignore_errors=True)

    async def _do_task(self, api: Api, task: Task) -> None:
        tdir = self.tasks_dir / task.task_id
        await asyncio.to_thread(self._forget_other_tasks, task.task_id)
        await asyncio.to_thread(_make_dir, "task folder", tdir)
        man = task.manifest
        model = tdir / "model.safetensors"
        update = tdir / "update.safetensors"
        record = tdir / "update.json"
        ids = f"job {task.job_id} round {task.round}/{task.num_rounds} task {task.task_id}"
        log.info("%s: starting (%d bytes)", ids, man.file_size)

        if await asyncio.to_thread(record.exists):
            saved = json.loads(await asyncio.to_thread(record.read_text))
            update_man = Manifest.model_validate(saved["manifest"])
            result = TrainResult(saved["num_samples"], saved["metrics"])
            log.info("%s: resuming with the update trained before", ids)
        else:
            # before the download: a plugin this site cannot load should not cost a model
            trainer = await asyncio.to_thread(load_trainer, task.trainer)
            self.progress.start(task.task_id, Phase.DOWNLOADING, man.file_size)
            await download_model(
                api,
                task.model_url,
                man,
                model,
                self.cfg.transfer,
                self.progress.add,
                self.stopping,
                self.metrics,
            )
            log.info("%s: model downloaded and verified", ids)
            self.progress.start(task.task_id, Phase.TRAINING, man.file_size)
            ctx = TrainContext(
                site=self.cfg.name,
                job_id=task.job_id,
                task_id=task.task_id,
                round=task.round,
                num_samples=self.cfg.num_samples,
                progress=self.progress.add,
            )
            update_man, result = await asyncio.to_thread(_train, trainer, task, model, update, ctx)
            saved = {
                "manifest": update_man.model_dump(mode="json"),
                "num_samples": result.num_samples,
                "metrics": result.metrics,
            }
            await asyncio.to_thread(_write_atomic, record, json.dumps(saved))
            log.info("%s: training done", ids)
            # the input model is no longer needed: free its disk before the upload
            await asyncio.to_thread(model.unlink, True)
        self.progress.start(task.task_id, Phase.UPLOADING, update_man.file_size)
        await upload_update(
            api,
            task.task_id,
            update,
            update_man,
            self.cfg.transfer,
            self.progress.add,
            self.stopping,
            self.metrics,
        )
        await commit_update(api, task.task_id, update_man, result.num_samples, result.metrics)
        self.metrics.update_committed()
        log.info("%s: update committed", ids)
        self.progress.start(task.task_id, Phase.DONE, update_man.file_size)
        await asyncio.to_thread(shutil.rmtree, tdir, True)


def _make_dir(what: str, path: Path) -> None:
    with on_disk(what, path, "create"):
        path.mkdir(parents=True, exist_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with on_disk("update record", path, "write"):
        tmp.write_text(text)
        tmp.replace(path)


def install_stop_handlers(stop: asyncio.Event) -> None:
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
