"""Configuration schemas for server, client and job files, and the one YAML loader.

Every setting lives here with its default, unit and meaning; call sites read typed
attributes and never supply defaults of their own. Files are validated once, at the CLI
edge, and an invalid file becomes one ``ConfigError`` naming the file, the field and
what is wrong.
"""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.timeouts import DEFAULT_TRAIN_TIMEOUT_S, Timeouts

MIB = 1024 * 1024
# the largest model a file can hold: a 64-bit signed offset
MAX_MODEL_BYTES = 2**63 - 1
CONFIG_DIR = "config_dir"  # validation context: the directory of the file being loaded
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SiteName = Annotated[str, Field(pattern=NAME_PATTERN)]
# a trainer plugin: ``factory`` in the importable module ``package.module``
PluginName = Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]


class _Frozen(BaseModel):
    # no infinity or NaN anywhere: a setting without a limit is null, never inf
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ServerTransferSettings(_Frozen):
    """How the server takes in update segments: through bounded hand-overs to disk."""

    io_chunk_kib: PositiveInt = Field(
        1024, le=65536, description="KiB handed to the disk writer at a time."
    )

    @property
    def io_chunk_bytes(self) -> int:
        return self.io_chunk_kib * 1024


class TransferSettings(ServerTransferSettings):
    """How a site moves models: in segments, several in flight, with retries.

    The window and the retries belong to the side that starts transfers, the site; the
    server's ``transfer:`` takes ``io_chunk_kib`` only and refuses the others by name.
    """

    window: PositiveInt = Field(
        4, le=64, description="Segments in flight at once, each on its own connection."
    )
    max_segment_attempts: PositiveInt = Field(
        5, description="Tries per segment before the transfer fails (digest errors, drops)."
    )


class TlsFiles(_Frozen):
    """Mutual TLS: this party's certificate and key, and the project CA that signs every peer.

    Relative paths are taken from the directory of the YAML file that names them, so a
    startup folder made by ``fl-provision`` works whatever the working directory.
    """

    cert: Path = Field(
        description=(
            "PEM certificate of this server, site or admin, issued by fl-provision. "
            "A relative path is taken from the config file's directory."
        )
    )
    key: Path = Field(
        description=(
            "PEM private key of `cert` (keep it mode 0600). A relative path is taken from "
            "the config file's directory."
        )
    )
    ca: Path = Field(
        description=(
            "PEM certificate of the project CA: the peer must present a certificate it "
            "signed. A relative path is taken from the config file's directory."
        )
    )

    @field_validator("cert", "key", "ca")
    @classmethod
    def _from_config_dir(cls, path: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get(CONFIG_DIR)
        if isinstance(base, Path) and not path.is_absolute():
            return base / path
        return path


class ServerLimits(_Frozen):
    """Bounds on what peers may hold open, so that none starves the others and nobody
    unauthenticated takes the room of sites and admins."""

    max_connections: PositiveInt = Field(
        1024,
        description=(
            "Open connections at once, TLS handshakes included. At it, a new connection "
            "closes the oldest one that has not authenticated yet (TLS handshake or first "
            "request head still to come) and takes its place; only when every open "
            "connection is authenticated is it answered 503 server_busy and closed."
        ),
    )
    max_uploads_per_client: PositiveInt = Field(
        16,
        description=(
            "Segment uploads one site may have in flight at once; more are answered 429 "
            "too_many_requests (the client retries). Keep it at or above the sites' "
            "transfer.window."
        ),
    )
    max_long_polls: PositiveInt = Field(
        512,
        description=(
            "get_task long-polls waiting at once, all sites together; more are answered "
            "503 server_busy."
        ),
    )
    max_long_polls_per_client: PositiveInt = Field(
        2,
        description=(
            "get_task long-polls one site may have waiting at once (a client daemon uses "
            "one); more are answered 429 too_many_requests."
        ),
    )
    request_head_timeout_s: PositiveFloat = Field(
        15.0,
        description=(
            "Seconds a new connection has, from its accept, to complete the TLS handshake "
            "and send the whole head (request line and headers) of its first request; "
            "past it, it is closed."
        ),
    )
    tls_handshake_timeout_s: PositiveFloat = Field(
        10.0,
        description=(
            "Seconds a new connection has to complete the TLS handshake. The handshake "
            "also counts against request_head_timeout_s: the smaller bound applies."
        ),
    )
    idle_timeout_s: PositiveFloat = Field(
        75.0,
        description=(
            "Seconds a keep-alive connection may wait between requests before the server "
            "closes it; a request in progress (a long-poll, a long transfer) is never idle. "
            "Keep it above the clients' own keep-alive (15 s), so that the client is the "
            "one to drop an unused connection."
        ),
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` surely means this machine only: ``localhost`` or a loopback IP.

    Other host names are not resolved here (validation stays pure); they count as
    reachable from outside.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_scheme(url: str, tls: TlsFiles | None) -> None:
    if url.startswith("https://") and tls is None:
        raise ValueError(
            f"server_url {url} is https:// but there is no tls: section; mutual TLS needs "
            "this party's certificate (cert, key, ca from fl-provision)"
        )
    if url.startswith("http://") and tls is not None:
        raise ValueError(
            f"server_url {url} is plain http:// but a tls: section is set; use https://"
        )


class ServerConfig(_Frozen):
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8470, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    workspace: Path = Field(description="Directory for the state database and model files.")
    timeouts: Timeouts = Timeouts()
    transfer: ServerTransferSettings = ServerTransferSettings()
    segment_mib: PositiveInt = Field(
        32,
        le=1024,
        description=(
            "MiB per segment of every model and update this server moves: the unit of "
            "acknowledgement, digest and resume."
        ),
    )
    client_gone_after_s: PositiveFloat = Field(
        60.0, description="Seconds without a heartbeat after which a client counts as gone."
    )
    long_poll_s: PositiveFloat = Field(
        20.0, le=600, description="Longest wait of a get_task call before it answers 'no task'."
    )
    aggregation_chunk_mib: PositiveInt = Field(
        2, le=1024, description="MiB of one tensor folded into the accumulator at a time."
    )
    shutdown_timeout_s: PositiveFloat = Field(
        30.0, description="Seconds SIGTERM waits for in-flight requests before closing them."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    tls: TlsFiles | None = Field(
        None,
        description=(
            "Mutual TLS (see `tls:` below): the server presents `cert` and accepts only "
            "clients and admins whose certificates the project CA signed. Without it the "
            "server speaks plain HTTP, trusts the X-FL-Client header, and logs a warning."
        ),
    )
    allow_insecure: bool = Field(
        False,
        description=(
            "Allow plain HTTP (no tls:) on a host other than loopback. Anyone who can "
            "reach the port can then act as any site or admin."
        ),
    )
    limits: ServerLimits = ServerLimits()
    model_dirs: list[Path] | None = Field(
        None,
        description=(
            "Directories a job's `model: {kind: file, path: ...}` may read from; a path "
            "anywhere else (symbolic links resolved) is refused at submit. null: only "
            "`models/` in the workspace."
        ),
    )

    @property
    def allowed_model_dirs(self) -> tuple[Path, ...]:
        if self.model_dirs is None:
            return (self.workspace / "models",)
        return tuple(self.model_dirs)

    @model_validator(mode="after")
    def _insecure_only_on_loopback(self) -> ServerConfig:
        if self.tls is None and not self.allow_insecure and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address and there is no tls: section; "
                "anyone who can reach it could pull models and push updates. Provision "
                "certificates with fl-provision and add tls:, or set allow_insecure: true"
            )
        return self

    @property
    def segment_bytes(self) -> int:
        return self.segment_mib * MIB

    @property
    def url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{self.host}:{self.port}"


class ClientConfig(_Frozen):
    name: SiteName = Field(description="Site name; must be unique in the project.")
    server_url: str = Field(
        pattern=r"^https?://", description="Base URL of the server, e.g. http://host:8470."
    )
    workspace: Path = Field(description="Directory for downloaded models and updates.")
    num_samples: PositiveInt = Field(
        1, description="Local sample count, the weight of this site's updates."
    )
    timeouts: Timeouts = Timeouts()
    transfer: TransferSettings = TransferSettings()
    heartbeat_interval_s: PositiveFloat = Field(10.0, description="Seconds between heartbeats.")
    keep_spare_files_s: NonNegativeFloat = Field(
        600.0,
        description=(
            "Seconds the site keeps the model-size files of its last task (the update, and "
            "the model unless the trainer writes in place) while no new task comes, for "
            "the next task to write over: "
            "faster than new files, above all on VMs that hand freed memory back to the "
            "host. 0: delete them at once."
        ),
    )
    retry_backoff_max_s: PositiveFloat = Field(
        10.0, description="Longest pause between reconnect attempts to the server."
    )
    shutdown_timeout_s: PositiveFloat = Field(
        30.0,
        description=(
            "Seconds SIGTERM waits for the segments in flight to finish before the daemon "
            "stops; whatever is left resumes on the next start."
        ),
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    progress_log_s: PositiveFloat = Field(
        10.0,
        description=(
            "Seconds between progress lines (bytes, rate, time left) in the log while a "
            "model downloads, trains or uploads."
        ),
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="TCP port serving Prometheus metrics at /metrics; null: no metrics server.",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the metrics port binds; 0.0.0.0 to let another host scrape it.",
    )
    tls: TlsFiles | None = Field(
        None,
        description=(
            "Mutual TLS (see `tls:` below), required with an https:// server_url: this "
            "site's certificate, which is also its identity on the server."
        ),
    )
    allowed_trainers: list[PluginName] = Field(
        default_factory=list,
        description=(
            "Trainer plugins (`package.module:factory`) this site runs when a job names "
            "them; the built-in `add_epsilon` always runs. A task naming any other trainer "
            "is refused before anything is imported, and the reason reaches the admin."
        ),
    )

    @model_validator(mode="after")
    def _scheme_matches_tls(self) -> ClientConfig:
        _check_scheme(self.server_url, self.tls)
        return self


class AdminConfig(_Frozen):
    server_url: str = Field(pattern=r"^https?://")
    timeouts: Timeouts = Timeouts()
    transfer: TransferSettings = Field(
        TransferSettings(),
        description="How `fl-admin submit --model` sends the model: window, retries.",
    )
    tls: TlsFiles | None = Field(
        None,
        description=(
            "Mutual TLS (see `tls:` below), required with an https:// server_url: this "
            "admin's certificate."
        ),
    )

    @model_validator(mode="after")
    def _scheme_matches_tls(self) -> AdminConfig:
        _check_scheme(self.server_url, self.tls)
        return self


class GeneratedModel(_Frozen):
    """An initial model the server generates, tensor by tensor, chunk by chunk."""

    kind: Literal["generated"] = "generated"
    num_tensors: PositiveInt = Field(le=100_000)
    tensor_mib: PositiveFloat | None = Field(
        None, description="Size of each tensor in MiB (1-D). Exclusive with tensor_shape."
    )
    tensor_shape: list[PositiveInt] | None = Field(None, description="Shape of each tensor.")
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = Field(
        "float32", description="Element type of every tensor (bfloat16: safetensors BF16)."
    )
    init: Literal["normal", "zeros", "arange"] = "normal"
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> GeneratedModel:
        if (self.tensor_mib is None) == (self.tensor_shape is None):
            raise ValueError("give exactly one of tensor_mib or tensor_shape")
        if self.tensor_shape is not None:
            nbytes = self.num_tensors * math.prod(self.tensor_shape) * 8
        else:
            assert self.tensor_mib is not None
            nbytes = self.num_tensors * int(self.tensor_mib * MIB)
        if nbytes > MAX_MODEL_BYTES:
            raise ValueError(
                f"the model would be about {nbytes} bytes, more than a file can hold "
                f"({MAX_MODEL_BYTES}, the 64-bit limit): give smaller tensors"
            )
        return self


class FileModel(_Frozen):
    """An initial model read from a safetensors file on the server's disk."""

    kind: Literal["file"] = "file"
    path: Path


UPLOAD_ID_PATTERN = r"^[0-9a-f]{32}$"


class UploadedModel(_Frozen):
    """An initial model an admin uploaded to the server (``fl-admin submit --model``).

    ``upload_id`` names the upload session, which is derived from the model's content;
    the server refuses the job until every segment of it is there and verified.
    """

    kind: Literal["uploaded"] = "uploaded"
    upload_id: str = Field(
        pattern=UPLOAD_ID_PATTERN,
        description="The upload's id, as `fl-admin submit --model` fills it in.",
    )


ModelSpec = Annotated[GeneratedModel | FileModel | UploadedModel, Field(discriminator="kind")]


class AddEpsilonParams(_Frozen):
    """Parameters of the built-in ``add_epsilon`` trainer."""

    epsilon: float = Field(0.001, allow_inf_nan=False, description="Added to every element.")
    chunk_mib: PositiveInt = Field(2, le=1024, description="MiB processed at a time.")


BUILTIN_TRAINER = "add_epsilon"


class TrainerSpec(_Frozen):
    name: str = Field(
        BUILTIN_TRAINER,
        pattern=r"^(add_epsilon|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        description="'add_epsilon' or 'package.module:factory' naming a trainer plugin.",
    )
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _builtin_params(self) -> TrainerSpec:
        if self.name == BUILTIN_TRAINER:
            AddEpsilonParams.model_validate(self.params)
        return self


class KeepRounds(_Frozen):
    """Which global models a job keeps on the server's disk. Each round writes a model;
    the default keeps the initial one, the last ``last`` rounds before the newest, and
    the newest (the final model once the job is done): a number that does not grow
    with the number of rounds."""

    initial: bool = Field(True, description="Keep the initial model (round 0).")
    last: NonNegativeInt = Field(
        1,
        le=100_000,
        description="Rounds kept before the newest one (the newest, final, is always kept).",
    )
    every: PositiveInt | None = Field(
        None, le=100_000, description="Also keep every N-th round (N, 2N, ...); null: none."
    )


class JobConfig(_Frozen):
    name: SiteName
    num_rounds: PositiveInt = Field(le=100_000)
    min_clients: PositiveInt = Field(description="Updates needed to close a round.")
    clients: list[SiteName] | None = Field(
        None, description="Only these sites take part; default: every connected site."
    )
    train_timeout: PositiveFloat | None = Field(
        DEFAULT_TRAIN_TIMEOUT_S,
        description=(
            "Seconds the controller waits for a client's result while its task makes no "
            "progress (no bytes moved, no training progress reported)."
        ),
    )
    wait_for_clients_s: PositiveFloat | None = Field(
        None, description="Fail the job if min_clients are not connected within this time."
    )
    model: ModelSpec
    trainer: TrainerSpec = TrainerSpec()
    keep: KeepRounds = Field(
        KeepRounds(),
        description="Which rounds' global models stay on the server (see `keep:` below).",
    )

    @model_validator(mode="after")
    def _enough_clients(self) -> JobConfig:
        if self.clients is not None and len(self.clients) < self.min_clients:
            raise ValueError(
                f"min_clients is {self.min_clients} but only {len(self.clients)} clients listed"
            )
        return self
