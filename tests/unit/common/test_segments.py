"""The segment protocol and the outcome table as tables: values in, values or errors out."""

from __future__ import annotations

from typing import Any

import pytest

from common import errors
from common.errors import (
    Conflict,
    FLError,
    IntegrityError,
    ProtocolError,
    RequestError,
    ResumeMismatch,
    SegmentTooLong,
    TransferTimeout,
)
from common.outcomes import RULES, Outcome, decided, outcome
from common.segments import (
    SegmentRequest,
    Segments,
    check_ack,
    check_arrived,
    check_complete,
    check_fetched,
    check_range_reply,
    check_resent,
    check_segment_request,
    journal_claims,
    journal_line,
    parse_journal,
    upload_todo,
)
from common.wire import DIGEST_HEADER, NUM_SAMPLES_HEADER, SegmentAck, UploadStatus
from fl_client.site.trainer import TrainerFailed
from fl_client.site.window import Interrupted

CUT = Segments(file_size=250, segment_bytes=100)  # segments 0-99, 100-199, 200-249

# -- the cut and what remains -------------------------------------------------------------


def test_the_cut() -> None:
    assert CUT.count == 3
    assert [CUT.range(i) for i in range(3)] == [(0, 100), (100, 200), (200, 250)]
    assert [CUT.size(i) for i in range(3)] == [100, 100, 50]
    assert Segments(0, 100).count == 1  # an empty file is one empty segment


@pytest.mark.parametrize(
    ("held", "todo", "exact", "committed"),
    [
        (set(), [0, 1, 2], 0, 0),
        ({0}, [1, 2], 100, 100),
        ({2}, [0, 1], 50, 100),  # the server counts whole segments, capped at the size
        ({1, 2}, [0], 150, 200),
        ({0, 1, 2}, [], 250, 250),
        ({7}, [0, 1, 2], 0, 100),  # an index outside the cut holds nothing of it
    ],
)
def test_remaining_and_held_bytes(
    held: set[int], todo: list[int], exact: int, committed: int
) -> None:
    assert CUT.remaining(held) == todo
    assert CUT.bytes_of(held & {0, 1, 2}) == exact
    assert CUT.committed_bytes(len(held)) == committed


def _status(file_size: int = 250, segment_bytes: int = 100, **kw: object) -> UploadStatus:
    fields: dict[str, object] = {
        "task_id": "t1",
        "file_size": file_size,
        "segment_bytes": segment_bytes,
        "num_segments": Segments(file_size, segment_bytes).count,
        "segments_done": [],
    }
    return UploadStatus.model_validate(fields | kw)


@pytest.mark.parametrize(
    ("done", "todo"), [([], [0, 1, 2]), ([1], [0, 2]), ([2, 0], [1]), ([0, 1, 2], [])]
)
def test_upload_sends_what_the_server_does_not_hold(done: list[int], todo: list[int]) -> None:
    assert upload_todo(CUT, _status(segments_done=done)) == todo


@pytest.mark.parametrize(
    "status",
    [_status(file_size=251), _status(segment_bytes=50), _status(num_segments=4)],
    ids=["size", "segment-bytes", "count"],
)
def test_upload_to_a_server_expecting_another_cut_is_a_resume_mismatch(
    status: UploadStatus,
) -> None:
    with pytest.raises(ResumeMismatch, match="server expects an update of"):
        upload_todo(CUT, status)


# -- checks of what arrived ---------------------------------------------------------------

GOOD_ACK = SegmentAck(index=1, start=100, end=200, digest="d1", committed_bytes=200)


def test_a_good_ack_passes() -> None:
    check_ack("upload of segment 1 of task t1", GOOD_ACK, 1, 100, 200, "d1")


@pytest.mark.parametrize(
    "ack",
    [
        GOOD_ACK.model_copy(update={"index": 2}),
        GOOD_ACK.model_copy(update={"start": 0}),
        GOOD_ACK.model_copy(update={"end": 250}),
        GOOD_ACK.model_copy(update={"digest": "other"}),
    ],
    ids=["index", "start", "end", "digest"],
)
def test_a_wrong_ack_is_an_integrity_error_naming_the_segment(ack: SegmentAck) -> None:
    with pytest.raises(IntegrityError) as err:
        check_ack("upload of segment 1 of task t1", ack, 1, 100, 200, "d1")
    assert err.value.message.startswith("upload of segment 1 of task t1: server acknowledged")
    assert "expected segment 1 at 100-200 with digest d1; the segment is sent again" in str(
        err.value
    )


def test_a_fetched_segment_must_match_the_manifest() -> None:
    check_fetched("download of segment 0 of m", "d0", "d0")
    with pytest.raises(IntegrityError, match="segment 0 of m: digest bad, manifest says d0"):
        check_fetched("download of segment 0 of m", "bad", "d0")


@pytest.mark.parametrize(
    ("status", "start", "end", "ok"),
    [
        (206, 100, 200, True),
        (200, 0, 250, True),  # the whole file, asked for as a range
        (200, 0, 100, False),
        (200, 100, 200, False),
        (416, 0, 100, False),
    ],
)
def test_a_range_request_must_get_its_range(status: int, start: int, end: int, ok: bool) -> None:
    if ok:
        check_range_reply("what", status, start, end, 250)
    else:
        with pytest.raises(ProtocolError, match=rf"what: server ignored the range \(HTTP {status}"):
            check_range_reply("what", status, start, end, 250)


# -- the download journal -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("", {}),
        ("0 aa\n1 bb\n", {0: "aa", 1: "bb"}),
        ("0 aa\n1 b", {0: "aa", 1: "b"}),  # torn in the digest: its check fails later
        ("0 aa\n1", {0: "aa"}),  # torn after the index
        ("0 aa\n1 bb\n2 c", {0: "aa", 1: "bb", 2: "c"}),
        ("0 aa\n0 cc\n", {0: "cc"}),  # fetched again: the last line wins
        ("x aa\n-1 aa\n1 2 3\n\n²  aa\n 3   dd \n", {3: "dd"}),  # garbage skipped
    ],
)
def test_journal_parsing(text: str, parsed: dict[int, str]) -> None:
    assert parse_journal(text) == parsed


def test_journal_lines_parse_back() -> None:
    text = journal_line(0, "aa") + journal_line(12, "bb")
    assert text == "0 aa\n12 bb\n"
    assert parse_journal(text) == {0: "aa", 12: "bb"}


def test_only_journal_entries_that_agree_with_the_manifest_are_claimed() -> None:
    journal = {0: "d0", 1: "stale", 2: "d2", 5: "d5"}
    assert journal_claims(journal, ["d0", "d1", "d2"]) == [0, 2]


# -- the server's checks of a segment upload ----------------------------------------------


def _request(
    index: str = "1",
    digest: str | None = "d1",
    weight: str | None = None,
    content_length: int | None = 100,
) -> SegmentRequest:
    return check_segment_request(
        CUT, index=index, digest=digest, weight=weight, content_length=content_length
    )


def test_a_good_segment_request() -> None:
    assert _request() == SegmentRequest(1, 100, 200, "d1", None)
    assert _request(index="2", content_length=50, weight="7") == SegmentRequest(
        2, 200, 250, "d1", 7
    )
    assert _request(content_length=None).size == 100  # chunked: the body is counted instead


@pytest.mark.parametrize(
    ("kwargs", "error", "words", "field"),
    [
        ({"index": "one"}, RequestError, "segment index must be an integer", "index"),
        ({"index": "3"}, RequestError, "segment index 3 is outside 0..2", "index"),
        ({"index": "-1"}, RequestError, "segment index -1 is outside 0..2", "index"),
        ({"digest": None}, RequestError, f"missing {DIGEST_HEADER} header", None),
        ({"digest": ""}, RequestError, f"missing {DIGEST_HEADER} header", None),
        (
            {"weight": "0"},
            RequestError,
            f"{NUM_SAMPLES_HEADER} must be a whole",
            NUM_SAMPLES_HEADER,
        ),
        ({"weight": "+5"}, RequestError, "got '\\+5'", NUM_SAMPLES_HEADER),
        ({"weight": "٣"}, RequestError, "at least 1", NUM_SAMPLES_HEADER),
        ({"content_length": 101}, SegmentTooLong, "Content-Length says 101", "body"),
        ({"content_length": 99}, RequestError, "segment 1 must be 100 bytes", "body"),
    ],
)
def test_a_bad_segment_request_is_refused_before_its_body(
    kwargs: dict[str, Any], error: type[FLError], words: str, field: str | None
) -> None:
    with pytest.raises(error, match=words) as err:
        _request(**kwargs)
    assert err.value.field == field
    if error is RequestError:
        assert type(err.value) is RequestError  # not its SegmentTooLong subclass


def test_the_body_must_have_the_declared_digest() -> None:
    req = _request()
    check_arrived(req, "t1", "d1")
    with pytest.raises(IntegrityError, match="arrived with digest bad, sender declared d1"):
        check_arrived(req, "t1", "bad")


def test_a_resent_segment_must_be_unchanged() -> None:
    req = _request()
    check_resent(req, "t1", "d1", "d1")
    with pytest.raises(Conflict, match=r"already held with digest d1; .* digest d9"):
        check_resent(req, "t1", "d9", "d1")


def test_a_commit_needs_every_segment() -> None:
    check_complete("t1", CUT, {0, 1, 2})
    with pytest.raises(Conflict, match=r"2 of 3 segments missing \(0, 2\)"):
        check_complete("t1", CUT, {1})
    many = Segments(1200, 100)
    with pytest.raises(Conflict, match=r"12 of 12 segments missing \(0, .*, 9 \.\.\.\)"):
        check_complete("t1", many, set())


# -- the outcome table --------------------------------------------------------------------

# what the daemon does with a task after each error class a site can meet
AT_THE_DAEMON: dict[Outcome, set[type[FLError]]] = {
    Outcome.RESUME: {
        errors.TransferError,
        errors.TransferTimeout,
        errors.TlsError,
        errors.IntegrityError,
        errors.SegmentTruncated,
        errors.ResumeMismatch,
    },
    Outcome.DISK: {errors.StorageError},
    Outcome.CONFLICT: {errors.Conflict, errors.SegmentBusy, errors.IllegalTransition},
    Outcome.RETRY_TASK: {
        FLError,
        errors.ConfigError,
        errors.RequestError,
        errors.NotFound,
        errors.Forbidden,
        errors.SegmentTooLong,
        errors.RangeNotSatisfiable,
        errors.TooManyRequests,
        errors.ServerBusy,
        errors.ProtocolError,
    },
    Outcome.GIVE_UP: {errors.UpdateRejected, errors.ModelFormatError, TrainerFailed},
    Outcome.DROP: {errors.TaskExpired},
    Outcome.STOP: {Interrupted},
}
# of those, the ones a transfer moves the segment again for, at once
IN_A_TRANSFER_AGAIN = {
    errors.TransferError,
    errors.TransferTimeout,
    errors.TlsError,
    errors.IntegrityError,
    errors.SegmentTruncated,
    errors.SegmentBusy,
    errors.TooManyRequests,
    errors.ServerBusy,
}
EXPECTED = {cls: then for then, classes in AT_THE_DAEMON.items() for cls in classes}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_outcome_of_each_error(cls: type[FLError]) -> None:
    err = cls("boom")
    assert outcome(err) is EXPECTED[cls]
    in_transfer = Outcome.RETRY_SEGMENT if cls in IN_A_TRANSFER_AGAIN else EXPECTED[cls]
    assert outcome(err, in_transfer=True) is in_transfer


def test_no_error_class_is_listed_twice() -> None:
    assert sum(map(len, AT_THE_DAEMON.values())) == len(EXPECTED)


def _tree(cls: type[FLError]) -> list[type[FLError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _tree(sub))]


def test_every_error_class_of_common_errors_is_a_decision() -> None:
    """A new class in common.errors fails here until the table and EXPECTED name it."""
    defined = {c for c in _tree(FLError) if c.__module__ == errors.__name__}
    assert defined - set(RULES) == set()
    assert defined - set(EXPECTED) == set()


def test_a_class_without_a_row_takes_its_nearest_ancestors() -> None:
    class Stalled(TransferTimeout):
        pass

    class Odd(FLError):
        pass

    assert outcome(Stalled("x"), in_transfer=True) is Outcome.RETRY_SEGMENT
    assert outcome(Stalled("x")) is Outcome.RESUME
    assert outcome(Odd("x"), in_transfer=True) is Outcome.RETRY_TASK


def test_a_class_is_decided_once() -> None:
    with pytest.raises(ValueError, match="TrainerFailed has a row"):
        decided(Outcome.RETRY_TASK)(TrainerFailed)
