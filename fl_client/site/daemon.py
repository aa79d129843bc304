"""The client daemon: heartbeat, pull a task, download, train, upload, commit, repeat.

Each task has a folder in the workspace holding what is done so far (see
``fl_client.site.taskdir``): the downloaded model, complete only once every segment
verified, then the update and its record (``update.json``, written when training
finished). A restarted daemon gets the same task from the server and continues from
the first step not yet done, after checking the update against its record; the
transfers themselves resume segment by segment. Folders of other tasks are removed
when a new task starts: their rounds are over.

A task that fails for a reason that may pass (a transfer, the disk, a busy server) is
taken up again after a pause that grows with each failure of that task
(``fl_client.site.retry``); which failures those are, and which give the task up or
drop it, is one table (``common.outcomes``) that the transfers read too. Across those
retries this process trusts what it verified or wrote itself (the download's segments,
the update) rather than reading it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from pathlib import Path
from typing import assert_never

from common import logctx
from common.config import ClientConfig
from common.errors import FLError, ModelFormatError
from common.http_client import Api, make_session
from common.modelio import ModelReader, ModelWriter, same_head
from common.outcomes import Outcome, outcome
from common.recycle import FilePool
from common.storage import is_disk_error, on_disk, storage_error
from common.tensorfile import Manifest
from common.wire import GET_TASK, HEARTBEAT, Heartbeat, Phase, Task, TaskReply
from fl_client.site.metrics import ClientMetrics
from fl_client.site.progress_log import ProgressLogger
from fl_client.site.retry import FIRST_RETRY_S, TaskBackoff, jittered
from fl_client.site.taskdir import (
    SavedUpdate,
    TaskFiles,
    drop_folder,
    forget_others,
    load_update,
    make_dir,
    save_update,
)
from fl_client.site.trainer import TrainContext, Trainer, TrainerFailed, TrainResult, load_trainer
from fl_client.site.transfer import (
    Interrupted,
    TransferContext,
    Verified,
    commit_update,
    download_model,
    report_failure,
    upload_update,
)
from fl_client.site.unjoined import run_unjoined

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


def _writes_in_place(trainer: Trainer) -> bool:
    """The trainer's own word that it may write its update over the model (see trainer)."""
    return getattr(trainer, "in_place", False) is True


def _train(
    trainer: Trainer,
    trainer_task: Task,
    model_path: Path,
    update_path: Path,
    ctx: TrainContext,
    pool: FilePool,
) -> tuple[Manifest, TrainResult]:
    """Run the trainer; any failure of the plugin becomes a ``TrainerFailed`` to report."""
    man = trainer_task.manifest
    with on_disk("model", model_path, "open"):
        reader = ModelReader(model_path)
    with reader:
        if reader.layout != man.layout:
            raise ModelFormatError(f"{model_path} does not match the task's manifest")
        with on_disk("model", model_path, "read"):
            # the update's header is the model's, __metadata__ included: the server
            # compares the two layouts, and the header's length is part of them
            meta = reader.metadata
            over = (
                model_path
                if _writes_in_place(trainer) and same_head(model_path, man.layout, meta)
                else None
            )
        with on_disk("update", update_path, "create"):
            # Not fsynced: a record found after a restart is checked against its update
            # (size and every segment's digest) before use, so a torn update after a
            # power loss is trained again. An fsync here would push every update to the
            # disk, though it is deleted once the server has it.
            writer = ModelWriter(
                update_path,
                man.layout,
                segment_bytes=man.segment_bytes,
                metadata=meta,
                durable=False,
                over=over,
                pool=pool,
            )
        with writer:
            try:
                result = trainer.train(reader, writer, ctx)
            except FLError:  # Interrupted (the daemon stops) among them
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
        # the model and update of the last task, for the next one to write over
        self.pool = FilePool(cfg.workspace / "spare", 2 if cfg.keep_spare_files_s > 0 else 0)
        self._last_task_end = time.monotonic()
        # kept across retries of one task within this process (see _do_task)
        self._download: tuple[str, Verified] | None = None
        self._update_written: str | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop``; then finish the segments in flight (bounded) and return."""
        await asyncio.to_thread(make_dir, "workspace", self.tasks_dir)
        logctx.bind(client=self.cfg.name)
        async with make_session(
            identity=self.cfg.name, connections=self.cfg.transfer.window + 4, tls=self.cfg.tls
        ) as session:
            api = Api(session, self.cfg.server_url, self.cfg.timeouts)
            transfers = TransferContext(
                api,
                self.cfg.transfer,
                self.progress.add,
                self.stopping,
                self.metrics,
                self.pool,
            )
            log.info("fl-client %s started; server %s", self.cfg.name, self.cfg.server_url)
            async with asyncio.TaskGroup() as tg:
                beat = tg.create_task(self._heartbeats(api))
                work = tg.create_task(self._work_loop(transfers))
                ticker = tg.create_task(self.progress.logger.run(self.progress))
                await stop.wait()
                log.info("fl-client %s stopping: finishing segments in flight", self.cfg.name)
                self.stopping.set()
                if self.progress.task_id is None:
                    work.cancel()  # idle in a long-poll: nothing to finish
                done, _ = await asyncio.wait([work], timeout=self.cfg.shutdown_timeout_s)
                if not done and self.progress.phase is Phase.TRAINING:
                    log.warning(
                        "training has not stopped after %g s (the trainer has not reported "
                        "progress since); leaving it: the task trains again on the next start",
                        self.cfg.shutdown_timeout_s,
                    )
                elif not done:
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

    async def _work_loop(self, transfers: TransferContext) -> None:
        api = transfers.api
        reconnect_s = FIRST_RETRY_S
        retry = TaskBackoff(max_s=self.cfg.retry_backoff_max_s)
        while not self.stopping.is_set():
            try:
                reply = await api.call(
                    "GET",
                    GET_TASK.format(client=self.cfg.name),
                    TaskReply,
                    params={"wait": str(POLL_WAIT_S)},
                    wait_s=POLL_WAIT_S,
                )
                reconnect_s = FIRST_RETRY_S
            except FLError as err:
                log.warning(
                    "cannot reach the server (%s); retrying in %.1f s", err.message, reconnect_s
                )
                await self._pause(reconnect_s)
                reconnect_s = min(self.cfg.retry_backoff_max_s, reconnect_s * 2)
                continue
            assert reply is not None
            if reply.task is None:
                if time.monotonic() - self._last_task_end > self.cfg.keep_spare_files_s:
                    await asyncio.to_thread(self.pool.clear)
                await asyncio.sleep(reply.retry_after_s * random.uniform(0.5, 1.0))
                continue
            task_id = reply.task.task_id
            bound = logctx.bind(job=reply.task.job_id, round=reply.task.round, task=task_id)
            pause_s: float | None = 0.0
            try:
                await self._do_task(transfers, reply.task)
                retry.reset()
            except FLError as err:
                pause_s = await self._after_failure(api, task_id, err, retry)
            finally:
                self.progress.idle()
                logctx.reset(bound)
                self._last_task_end = time.monotonic()
            if pause_s is None:
                return
            if pause_s:
                await self._pause(pause_s)

    async def _after_failure(
        self, api: Api, task_id: str, err: FLError, retry: TaskBackoff
    ) -> float | None:
        """Act on ``err`` as the outcome table says (``common.outcomes``).

        Returns the pause before the task is taken up again (0 for none), or None when
        the daemon stops. A task that is over (given up, gone) resets the backoff.
        """
        then = outcome(err)
        match then:
            case Outcome.STOP:
                log.info("task %s paused: %s", task_id, err.message)
                return None
            case Outcome.DROP:
                log.warning("%s", err.message)
                retry.reset()
                await asyncio.to_thread(drop_folder, self.tasks_dir / task_id, self.pool)
                return 0.0
            case Outcome.GIVE_UP:
                log.error("task %s cannot be completed: %s", task_id, err.message)
                retry.reset()
                await self._give_up(api, task_id, err.message)
                return 0.0
            case Outcome.DISK:
                pause_s = retry.failed(task_id)
                log.error(
                    "task %s: this site's disk failed: %s; trying again in %.1f s (free space "
                    "or fix the disk under %s)",
                    task_id,
                    err.message,
                    pause_s,
                    self.cfg.workspace,
                )
                return pause_s
            case Outcome.CONFLICT:
                pause_s = retry.failed(task_id)
                log.warning("task %s: %s; trying again in %.1f s", task_id, err.message, pause_s)
                return pause_s
            case Outcome.RESUME | Outcome.RETRY_SEGMENT:  # the latter only inside a transfer
                pause_s = retry.failed(task_id)
                log.warning(
                    "task %s interrupted: %s; will resume in %.1f s", task_id, err.message, pause_s
                )
                return pause_s
            case Outcome.RETRY_TASK:
                pause_s = retry.failed(task_id)
                log.error(
                    "task %s failed: %s; trying again in %.1f s", task_id, err.message, pause_s
                )
                return pause_s
            case _:
                assert_never(then)

    async def _pause(self, seconds: float) -> None:
        """Sleep about ``seconds``, or until the daemon is told to stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(jittered(seconds)):
                await self.stopping.wait()

    async def _give_up(self, api: Api, task_id: str, reason: str) -> None:
        """Tell the server, so the round goes on without this site, and drop the task."""
        try:
            await report_failure(api, task_id, reason)
        except FLError as err:
            log.warning("could not report the failure of task %s: %s", task_id, err.message)
        await asyncio.to_thread(drop_folder, self.tasks_dir / task_id, self.pool)

    def _verified_download(self, task_id: str) -> Verified:
        """What this process has verified of the task's download (kept across retries)."""
        if self._download is None or self._download[0] != task_id:
            self._download = (task_id, Verified())
        return self._download[1]

    async def _do_task(self, transfers: TransferContext, task: Task) -> None:
        api = transfers.api
        files = TaskFiles(self.tasks_dir / task.task_id)
        await asyncio.to_thread(forget_others, self.tasks_dir, task.task_id, self.pool)
        await asyncio.to_thread(make_dir, "task folder", files.folder)
        man = task.manifest
        ids = f"job {task.job_id} round {task.round}/{task.num_rounds} task {task.task_id}"
        log.info("%s: starting (%d bytes)", ids, man.file_size)

        # an update this process wrote is trusted; one found on disk is read back first
        check = self._update_written != task.task_id
        # reading a large update back takes a while: a stop must not wait for it
        saved, problem = await run_unjoined(
            "update check", functools.partial(load_update, files, check=check)
        )
        if problem is not None:
            log.warning(
                "%s: the update trained before cannot be used (%s); training again", ids, problem
            )
        elif saved is not None and check:
            log.info("%s: resuming with the update trained before (it matches its record)", ids)
        if saved is None:
            saved = await self._download_and_train(transfers, task, files, ids)
        # the input model (there is none left after an in-place trainer) is no longer
        # needed: the next download writes over it
        await asyncio.to_thread(self.pool.retire, files.model)
        self.progress.start(task.task_id, Phase.UPLOADING, saved.manifest.file_size)
        await upload_update(
            transfers,
            task.task_id,
            files.update,
            saved.manifest,
            num_samples=saved.result.num_samples,
        )
        result = saved.result
        await commit_update(api, task.task_id, saved.manifest, result.num_samples, result.metrics)
        self.metrics.update_committed()
        log.info("%s: update committed", ids)
        self.progress.start(task.task_id, Phase.DONE, saved.manifest.file_size)
        # the task is done: its model-size files go to the pool for the next task to
        # write over (a crash before leaves them to the next task's forget_others)
        await asyncio.to_thread(drop_folder, files.folder, self.pool)

    async def _download_and_train(
        self, transfers: TransferContext, task: Task, files: TaskFiles, ids: str
    ) -> SavedUpdate:
        man = task.manifest
        # before the download: a plugin this site cannot load should not cost a model
        trainer = await asyncio.to_thread(load_trainer, task.trainer, self.cfg.allowed_trainers)
        self.progress.start(task.task_id, Phase.DOWNLOADING, man.file_size)
        await download_model(
            transfers, task.model_url, man, files.model, self._verified_download(task.task_id)
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
        update_man, result = await run_unjoined(
            f"trainer {task.task_id}",
            functools.partial(_train, trainer, task, files.model, files.update, ctx, self.pool),
        )
        saved = SavedUpdate(update_man, result)
        # the record goes last, atomically: no record, or one for a complete update
        await asyncio.to_thread(save_update, files, saved)
        self._update_written = task.task_id
        log.info("%s: training done", ids)
        return saved


def install_stop_handlers(stop: asyncio.Event) -> None:
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
