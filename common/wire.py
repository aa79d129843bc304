"""The HTTP API: routes and the JSON bodies they exchange.

Model bytes never travel as JSON: models are fetched with range requests from
``model_url`` and updates are uploaded as raw segment bodies. Everything here is small.
A client names itself in the ``X-FL-Client`` header; with mutual TLS the certificate
decides instead. Errors are ``{"code", "message", "field"}`` (see ``common.errors``).
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

from common.config import JobConfig, TrainerSpec
from common.tensorfile import Manifest

API = "/v1"
CLIENT_HEADER = "X-FL-Client"
DIGEST_HEADER = "X-FL-Digest"
# on update segments: the weight the site will commit, so the server can average the
# round while updates still arrive (optional; the commit's weight decides)
NUM_SAMPLES_HEADER = "X-FL-Num-Samples"

# client routes
HEARTBEAT = API + "/clients/{client}/heartbeat"
GET_TASK = API + "/clients/{client}/task"
TASK_MODEL = API + "/tasks/{task_id}/model"
UPLOAD_STATUS = API + "/tasks/{task_id}/upload"
UPLOAD_SEGMENT = API + "/tasks/{task_id}/upload/{index}"
COMMIT = API + "/tasks/{task_id}/commit"
TASK_FAIL = API + "/tasks/{task_id}/fail"
# admin routes
JOBS = API + "/admin/jobs"
JOB = API + "/admin/jobs/{job_id}"
JOB_ABORT = API + "/admin/jobs/{job_id}/abort"
JOB_MODEL = API + "/admin/jobs/{job_id}/model"
JOB_CHECKPOINT = API + "/admin/jobs/{job_id}/checkpoint"
JOB_MANIFEST = API + "/admin/jobs/{job_id}/manifest"
CLIENTS = API + "/admin/clients"
UPLOADS = API + "/admin/uploads"
UPLOAD = API + "/admin/uploads/{upload_id}"
UPLOAD_FILE_SEGMENT = API + "/admin/uploads/{upload_id}/files/{name}/{index}"
HEALTH = API + "/health"


# the largest count a byte or sample field takes: the database's 64-bit integers
MAX_COUNT = 2**63 - 1
# the largest sample count: weights are summed in float64, exact for integers up to 2**53
MAX_SAMPLES = 2**53


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class JobState(enum.StrEnum):
    PENDING = "pending"  # its initial model is being prepared; no round has opened
    RUNNING = "running"  # rounds run (a round may wait for min_clients sites)
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"


class TaskState(enum.StrEnum):
    ASSIGNED = "assigned"  # issued, result not yet committed
    COMMITTED = "committed"  # update verified and durable; it counts in the aggregate
    REJECTED = "rejected"  # update failed verification; the round goes on without it
    EXPIRED = "expired"  # the round closed without this task's result


class Phase(enum.StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    TRAINING = "training"
    UPLOADING = "uploading"
    DONE = "done"


class Heartbeat(_Wire):
    task_id: str | None = None
    phase: Phase = Phase.IDLE
    bytes_done: NonNegativeInt = Field(0, le=MAX_COUNT)
    bytes_total: NonNegativeInt = Field(0, le=MAX_COUNT)


class HeartbeatReply(_Wire):
    server_time: float


class Task(_Wire):
    task_id: str
    job_id: str
    job_name: str
    round: PositiveInt
    num_rounds: PositiveInt
    trainer: TrainerSpec
    manifest: Manifest
    model_url: str


class TaskReply(_Wire):
    task: Task | None = None
    retry_after_s: float = 0.0


class UploadStatus(_Wire):
    task_id: str
    file_size: int
    segment_bytes: int
    num_segments: int
    segments_done: list[int]


class SegmentAck(_Wire):
    index: int
    start: int
    end: int
    digest: str
    committed_bytes: int = Field(description="Bytes of the update the server now holds.")


class CommitRequest(_Wire):
    digest: str = Field(min_length=1)
    num_samples: PositiveInt = Field(le=MAX_SAMPLES)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=1000)


class TaskFailure(_Wire):
    """A site gives up on its task (its trainer failed, its update was refused)."""

    reason: str = Field(min_length=1, max_length=4000)


class CommitReply(_Wire):
    task_id: str
    state: TaskState


class SubmitJob(_Wire):
    config: JobConfig


class JobSubmitted(_Wire):
    job_id: str


class TaskInfo(_Wire):
    task_id: str
    client: str
    round: int
    state: TaskState
    phase: Phase
    bytes_done: int
    bytes_total: int
    num_samples: int | None = None
    reason: str | None = None


class RoundInfo(_Wire):
    round: int
    state: Literal["open", "closed"]
    started_at: float
    closed_at: float | None = None
    num_updates: int = 0


class JobInfo(_Wire):
    job_id: str
    name: str
    state: JobState
    round: int = Field(description="Rounds completed so far.")
    num_rounds: int
    reason: str | None = None
    created_at: float
    updated_at: float
    model_bytes: int = 0


class JobDeleted(_Wire):
    job_id: str
    deleted: Literal[True] = True


class JobStatus(_Wire):
    job: JobInfo
    rounds: list[RoundInfo]
    tasks: list[TaskInfo]


class ClientInfo(_Wire):
    name: str
    last_seen: float
    seconds_since_seen: float
    alive: bool
    phase: Phase
    task_id: str | None = None


# model uploads with a job (``fl-admin submit --model``); checks in ``common.uploads``


class UploadFile(_Wire):
    """One file of an uploaded model: its plain name, size and segment digests."""

    name: str = Field(min_length=1, max_length=255)
    size: PositiveInt
    segment_digests: list[str] = Field(min_length=1)


class UploadDescription(_Wire):
    """What an admin is about to upload; the server derives the session from it."""

    segment_bytes: PositiveInt
    files: list[UploadFile] = Field(min_length=1)
    digest: str = Field(description="common.uploads.model_digest of the rest.")


class UploadFileStatus(_Wire):
    name: str
    size: int
    num_segments: int
    segments_done: list[int]


class UploadSession(_Wire):
    upload_id: str
    segment_bytes: int
    digest: str
    files: list[UploadFileStatus]
    complete: bool = Field(description="Every segment of every file is acknowledged.")


class UploadSummary(_Wire):
    upload_id: str
    bytes_total: int
    bytes_done: int
    complete: bool


class UploadsInfo(_Wire):
    """The server's terms for uploads (its segment size, how many files) and the
    uploads it holds."""

    segment_bytes: int
    max_files: int
    uploads: list[UploadSummary]
