"""One exception tree for the whole project.

    FLError                      any failure we can explain to a user
    ├── ConfigError              a YAML file or setting is invalid (exit, no traceback)
    ├── RequestError             a request is malformed or refers to something wrong (4xx)
    │   ├── NotFound             unknown job, task, client or model (404)
    │   ├── Forbidden            the caller may not do this (403)
    │   ├── Conflict             the request clashes with current state (409)
    │   │   ├── TaskExpired      the task's round has closed (410)
    │   │   ├── SegmentBusy      the same segment is being received already (409)
    │   │   └── IllegalTransition  a job, round or task cannot take this event now (409)
    │   ├── UpdateRejected       an update failed verification (422)
    │   ├── SegmentTooLong       a segment's body is longer than the segment (413)
    │   ├── RangeNotSatisfiable  a Range header the model route cannot answer (416)
    │   └── TooManyRequests      the caller has too many requests of a kind open (429)
    ├── ServerBusy               the server is at a limit for everyone (503)
    ├── StorageError             the local disk or state database failed (507)
    ├── TransferError            moving bytes failed
    │   ├── TransferTimeout      a progress timer fired (names the stage and peer)
    │   ├── TlsError             no TLS session: handshake refused by either side
    │   ├── IntegrityError       a digest did not match
    │   ├── SegmentTruncated     a segment's body ended early (400)
    │   └── ResumeMismatch       the two sides disagree on what was already moved
    ├── ProtocolError            the peer answered something the protocol does not allow
    └── ModelFormatError         a model file is not valid safetensors / not as declared

Every error carries a machine code, an HTTP status and, where it applies, the field it
is about. On the wire an error is ``{"code", "message", "field"}``; ``from_wire`` turns
it back into the same class on the other side, so a client sees the server's words.
Foreign errors (aiohttp, OSError, numpy) are translated once, at the edge, with
``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FLError(Exception):
    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field}

    def __str__(self) -> str:
        return self.message


class ConfigError(FLError):
    code = "config_invalid"
    http_status = 400


class RequestError(FLError):
    code = "bad_request"
    http_status = 400


class NotFound(RequestError):
    code = "not_found"
    http_status = 404


class Forbidden(RequestError):
    code = "forbidden"
    http_status = 403


class Conflict(RequestError):
    code = "conflict"
    http_status = 409


class TaskExpired(Conflict):
    code = "task_expired"
    http_status = 410


class SegmentBusy(Conflict):
    """Another connection is still delivering this segment: try again in a moment."""

    code = "segment_busy"
    http_status = 409


class IllegalTransition(Conflict):
    """A job, round or task asked to take an event its state does not allow (see
    ``fl_server.core.transitions``)."""

    code = "illegal_transition"


class UpdateRejected(RequestError):
    code = "update_rejected"
    http_status = 422


class TooManyRequests(RequestError):
    """A per-caller limit (uploads in flight, long-polls) is reached; retry later."""

    code = "too_many_requests"
    http_status = 429


class ServerBusy(FLError):
    """A server-wide limit (open connections, long-poll waiters) is reached; retry later."""

    code = "server_busy"
    http_status = 503


class TransferError(FLError):
    code = "transfer_failed"
    http_status = 502


class TransferTimeout(TransferError):
    code = "transfer_timeout"
    http_status = 504


class TlsError(TransferError):
    """The TLS handshake failed: a certificate was refused by one side or the other.

    Raised on the caller's side only; the server logs its side of the refusal.
    """

    code = "tls_failed"
    http_status = 502


class IntegrityError(TransferError):
    code = "integrity_error"
    http_status = 422


class ResumeMismatch(TransferError):
    code = "resume_mismatch"
    http_status = 409


class ProtocolError(FLError):
    code = "protocol_error"
    http_status = 502


class ModelFormatError(FLError):
    code = "model_format"
    http_status = 422


class SegmentTooLong(RequestError):
    code = "segment_too_long"
    http_status = 413


class SegmentTruncated(TransferError):
    code = "segment_truncated"
    http_status = 400


class RangeNotSatisfiable(RequestError):
    code = "range_not_satisfiable"
    http_status = 416


class StorageError(FLError):
    """The disk or the state database refused (full, read-only, I/O error): not the peer's
    fault, and not fixed by sending again until an operator acts."""

    code = "storage_error"
    http_status = 507


def _all_subclasses(cls: type[FLError]) -> list[type[FLError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def _by_code() -> dict[str, type[FLError]]:
    """Code -> the class that declares it, looked up when needed so that subclasses defined
    in other modules count too; a subclass that only inherits a code does not take it."""
    return {c.code: c for c in _all_subclasses(FLError) if "code" in vars(c)}


def from_wire(payload: object, *, status: int) -> FLError:
    """Rebuild the server's error on the caller's side; unknown shapes become FLError."""
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        cls = _by_code().get(str(payload.get("code")), FLError)
        field = payload.get("field")
        return cls(payload["message"], field=field if isinstance(field, str) else None)
    return FLError(f"server answered HTTP {status} without an error body")
