"""The segment protocol, without I/O: what to move, what to accept, what to do on failure.

Theory of operation. A model or an update is cut into segments of ``segment_bytes``
(the last one shorter), numbered from 0; ``Segments`` is that cut. The receiver's
record of what it holds decides what moves: a site downloading a model trusts its
journal (one ``index digest`` line per verified segment) only where it agrees with the
manifest; a site uploading asks the server which segments it holds and sends the rest.
Every segment comes with a digest: the downloader checks it against the manifest, the
server checks it against the one the sender declared, and the sender checks the
server's acknowledgement against the segment it sent. A mismatch is an error of the
project's tree naming the segment; what a site does next is decided by one table, in
``common.outcomes``.

Both sides use this module: the site's ``fl_client.site.download`` and
``fl_client.site.transfer`` (uploads), and the server's ``fl_server.api_client`` and
``fl_server.intake`` (its side of an upload). It touches no socket, file or
clock: values in, values or errors out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from common.errors import (
    Conflict,
    IntegrityError,
    ProtocolError,
    RequestError,
    ResumeMismatch,
    SegmentTooLong,
)
from common.wire import (
    DIGEST_HEADER,
    MAX_SAMPLES,
    NUM_SAMPLES_HEADER,
    SegmentAck,
    UploadStatus,
)

# -- the cut ------------------------------------------------------------------------------


def segment_count(total_bytes: int, segment_bytes: int) -> int:
    return max(1, -(-total_bytes // segment_bytes))


def segment_range(index: int, total_bytes: int, segment_bytes: int) -> tuple[int, int]:
    """Byte range [start, end) of segment ``index`` of a file of ``total_bytes``."""
    start = index * segment_bytes
    return start, min(total_bytes, start + segment_bytes)


@dataclass(frozen=True)
class Segments:
    """How a file of ``file_size`` bytes is cut into segments of ``segment_bytes``."""

    file_size: int
    segment_bytes: int

    @property
    def count(self) -> int:
        return segment_count(self.file_size, self.segment_bytes)

    def range(self, index: int) -> tuple[int, int]:
        return segment_range(index, self.file_size, self.segment_bytes)

    def size(self, index: int) -> int:
        start, end = self.range(index)
        return end - start

    def bytes_of(self, indices: Iterable[int]) -> int:
        """The exact bytes the segments ``indices`` hold together."""
        return sum(self.size(i) for i in indices)

    def committed_bytes(self, held: int) -> int:
        """The bytes reported as held for ``held`` segments (as the server counts them)."""
        return min(self.file_size, held * self.segment_bytes)

    def remaining(self, held: Collection[int]) -> list[int]:
        """The segments still to move, in order, when the receiver holds ``held``."""
        return [i for i in range(self.count) if i not in held]


# -- the site's side ----------------------------------------------------------------------


def upload_todo(ours: Segments, status: UploadStatus) -> list[int]:
    """The segments of our update the server does not hold yet.

    The server must expect the very cut we have; otherwise its segments are not ours
    and resuming on top of them would build a different update.
    """
    theirs = Segments(status.file_size, status.segment_bytes)
    if theirs != ours or status.num_segments != ours.count:
        raise ResumeMismatch(
            f"server expects an update of {status.file_size} bytes in segments of "
            f"{status.segment_bytes}; ours is {ours.file_size} bytes in {ours.segment_bytes}"
        )
    return ours.remaining(set(status.segments_done))


def check_fetched(what: str, digest: str, expected: str) -> None:
    """A downloaded segment must have the manifest's digest; if not, it is fetched again."""
    if digest != expected:
        raise IntegrityError(f"{what}: digest {digest}, manifest says {expected}")


def check_range_reply(what: str, status: int, start: int, end: int, file_size: int) -> None:
    """A range request must get its range (206), or the whole file when it asked for it."""
    if status != 206 and not (status == 200 and start == 0 and end == file_size):
        raise ProtocolError(f"{what}: server ignored the range (HTTP {status})")


def check_ack(what: str, ack: SegmentAck, index: int, start: int, end: int, digest: str) -> None:
    """The server's acknowledgement must name the segment sent, its bytes and its digest.

    Anything else means the server stored something other than what was sent: an
    ``IntegrityError``, so the segment is sent again.
    """
    if (ack.index, ack.start, ack.end, ack.digest) != (index, start, end, digest):
        raise IntegrityError(
            f"{what}: server acknowledged {ack}, expected segment {index} at {start}-{end} "
            f"with digest {digest}; the segment is sent again"
        )


# -- the download journal -----------------------------------------------------------------


def journal_line(index: int, digest: str) -> str:
    return f"{index} {digest}\n"


def parse_journal(text: str) -> dict[int, str]:
    """``{index: digest}`` of a download journal; lines that are not one entry are skipped.

    The journal is appended to without a sync, so its last line may be torn by a crash:
    such a line, like any garbage, names no segment, and that segment is fetched again.
    """
    out: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isascii() and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    return out


def journal_claims(journal: Mapping[int, str], digests: Sequence[str]) -> list[int]:
    """The journal's segments that agree with the manifest's ``digests`` (to check on disk)."""
    return [i for i, d in journal.items() if i < len(digests) and d == digests[i]]


# -- the server's side --------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentRequest:
    """An upload of one segment, as its request line and headers declare it."""

    index: int
    start: int
    end: int
    digest: str  # the sender's digest of the body
    weight: int | None  # the sample count the site will commit, if it says

    @property
    def size(self) -> int:
        return self.end - self.start


def parse_weight(raw: str | None) -> int | None:
    """The sample count a segment declares: ASCII digits only (``int()`` alone would also
    take ``+5``, ``5_0`` or other scripts' digits, none of which a site sends)."""
    if raw is None:
        return None
    try:
        value = int(raw) if raw.isascii() and raw.isdigit() else 0
    except ValueError:  # beyond Python's limit on digits in a number
        value = 0
    if not 1 <= value <= MAX_SAMPLES:
        raise RequestError(
            f"{NUM_SAMPLES_HEADER} must be a whole number of samples of at least 1 and at most "
            f"{MAX_SAMPLES}, got {raw[:40]!r}",
            field=NUM_SAMPLES_HEADER,
        )
    return value


def check_segment_request(
    cut: Segments,
    *,
    index: str,
    digest: str | None,
    weight: str | None,
    content_length: int | None,
) -> SegmentRequest:
    """The request for one segment of an update, checked before any byte of it is read."""
    try:
        i = int(index)
    except ValueError:
        raise RequestError("segment index must be an integer", field="index") from None
    if not 0 <= i < cut.count:
        raise RequestError(f"segment index {i} is outside 0..{cut.count - 1}", field="index")
    start, end = cut.range(i)
    if not digest:
        raise RequestError(f"missing {DIGEST_HEADER} header with the segment's xxh3 digest")
    req = SegmentRequest(i, start, end, digest, parse_weight(weight))
    if content_length is not None and content_length != req.size:
        error = SegmentTooLong if content_length > req.size else RequestError
        raise error(
            f"segment {i} must be {req.size} bytes, Content-Length says {content_length}",
            field="body",
        )
    return req


def check_arrived(req: SegmentRequest, task_id: str, digest: str) -> None:
    """The body received must have the digest its sender declared."""
    if digest != req.digest:
        raise IntegrityError(
            f"segment {req.index} of task {task_id} arrived with digest {digest}, "
            f"sender declared {req.digest}; send it again",
            field="body",
        )


def check_resent(req: SegmentRequest, task_id: str, digest: str, acked: str) -> None:
    """A segment already acknowledged may come again (its ack was lost), but unchanged."""
    if digest != acked:
        raise Conflict(
            f"segment {req.index} of task {task_id} is already held with digest {acked}; "
            f"the bytes sent again have digest {digest} and were not stored",
            field="body",
        )


def check_complete(task_id: str, cut: Segments, held: Collection[int]) -> None:
    """An update is committed only once the server holds every one of its segments."""
    missing = cut.remaining(held)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise Conflict(
            f"update of task {task_id} is incomplete: {len(missing)} of {cut.count} "
            f"segments missing ({shown}); upload them before committing",
            field="segments",
        )
