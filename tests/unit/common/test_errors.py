"""Unit tests for common.errors: the exception tree and its wire form."""

from __future__ import annotations

import pytest

from common import errors
from common.errors import (
    ConfigError,
    Conflict,
    FLError,
    Forbidden,
    IntegrityError,
    ModelFormatError,
    NotFound,
    RequestError,
    ResumeMismatch,
    TaskExpired,
    TransferError,
    TransferTimeout,
    UpdateRejected,
    from_wire,
)


def _tree(cls: type[FLError]) -> list[type[FLError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_tree(sub))
    return out


# Every class defined in common.errors (picked up automatically, so a new one is covered).
ALL_CLASSES = [c for c in _tree(FLError) if c.__module__ == errors.__name__]

# The documented codes and statuses.
EXPECTED = {
    FLError: ("error", 500),
    ConfigError: ("config_invalid", 400),
    RequestError: ("bad_request", 400),
    NotFound: ("not_found", 404),
    Forbidden: ("forbidden", 403),
    Conflict: ("conflict", 409),
    TaskExpired: ("task_expired", 410),
    UpdateRejected: ("update_rejected", 422),
    TransferError: ("transfer_failed", 502),
    TransferTimeout: ("transfer_timeout", 504),
    IntegrityError: ("integrity_error", 422),
    ResumeMismatch: ("resume_mismatch", 409),
    ModelFormatError: ("model_format", 422),
}


def test_documented_classes_are_all_present() -> None:
    assert set(EXPECTED) <= set(ALL_CLASSES)
    assert len(ALL_CLASSES) >= 14


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_code_and_status(cls: type[FLError]) -> None:
    assert (cls.code, cls.http_status) == EXPECTED[cls]


def test_codes_are_unique() -> None:
    codes = [c.code for c in ALL_CLASSES]
    assert len(codes) == len(set(codes)), codes


def test_hierarchy() -> None:
    assert issubclass(TaskExpired, Conflict)
    assert issubclass(Conflict, RequestError)
    assert issubclass(UpdateRejected, RequestError)
    assert issubclass(NotFound, RequestError)
    assert issubclass(Forbidden, RequestError)
    assert issubclass(TransferTimeout, TransferError)
    assert issubclass(IntegrityError, TransferError)
    assert issubclass(ResumeMismatch, TransferError)
    assert not issubclass(ConfigError, RequestError)
    assert not issubclass(ModelFormatError, TransferError)
    for cls in ALL_CLASSES:
        assert issubclass(cls, FLError)
        assert issubclass(cls, Exception)


def test_message_and_field_attributes() -> None:
    err = NotFound("no job 'j1'", field="job_id")
    assert err.message == "no job 'j1'"
    assert str(err) == "no job 'j1'"
    assert err.field == "job_id"
    assert err.args == ("no job 'j1'",)
    assert FLError("x").field is None


def test_to_wire_exact() -> None:
    assert UpdateRejected("bad shape", field="tensors").to_wire() == {
        "code": "update_rejected",
        "message": "bad shape",
        "field": "tensors",
    }
    assert FLError("boom").to_wire() == {"code": "error", "message": "boom", "field": None}


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("field", ["timeouts.communication_timeout", None])
def test_round_trip(cls: type[FLError], field: str | None) -> None:
    original = cls(f"something about {cls.__name__} went wrong", field=field)
    back = from_wire(original.to_wire(), status=cls.http_status)
    assert type(back) is cls
    assert back.message == original.message
    assert str(back) == original.message
    assert back.field == field


def test_round_trip_is_driven_by_code_not_status() -> None:
    back = from_wire({"code": "not_found", "message": "m", "field": None}, status=500)
    assert type(back) is NotFound


def test_non_string_field_is_dropped() -> None:
    back = from_wire({"code": "conflict", "message": "m", "field": 7}, status=409)
    assert type(back) is Conflict
    assert back.field is None


def test_missing_field_key() -> None:
    back = from_wire({"code": "forbidden", "message": "nope"}, status=403)
    assert type(back) is Forbidden
    assert back.message == "nope"
    assert back.field is None


def test_unknown_code_keeps_message_as_plain_flerror() -> None:
    back = from_wire({"code": "martian", "message": "hello", "field": "f"}, status=418)
    assert type(back) is FLError
    assert back.message == "hello"
    assert back.field == "f"


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "Internal Server Error",
        ["code", "message"],
        {},
        {"code": "not_found"},
        {"code": "not_found", "message": 42},
        {"error": "something"},
    ],
    ids=["none", "text", "list", "empty", "no-message", "message-not-str", "foreign"],
)
def test_unknown_payload_becomes_flerror_naming_status(payload: object) -> None:
    back = from_wire(payload, status=503)
    assert type(back) is FLError
    assert "HTTP 503" in back.message
    assert back.field is None


def test_from_wire_knows_codes_of_every_declared_class() -> None:
    from common import errors

    for cls in (errors.SegmentTooLong, errors.RangeNotSatisfiable, errors.StorageError):
        err = errors.from_wire({"code": cls.code, "message": "m"}, status=cls.http_status)
        assert type(err) is cls


def test_a_subclass_that_only_inherits_a_code_does_not_take_it() -> None:
    from common import errors

    class Local(errors.Conflict):
        pass

    assert type(errors.from_wire({"code": "conflict", "message": "m"}, status=409)) is (
        errors.Conflict
    )
    assert Local.code == "conflict"
