"""What a site does after an error: one table from error class to outcome.

Theory of operation. A failure meets a site at two levels. Inside a transfer, a
segment that failed for a passing reason (a broken connection, a stall, a digest
mismatch, a busy server) is moved again at once, up to ``max_segment_attempts`` times.
A failure that leaves the transfer, or any other step of a task, reaches the daemon,
which takes the task up again after a backoff, gives it up (telling the server), drops
it (its round is over), or stops. Both levels read the same row of ``RULES``: ``now``
says whether a segment is tried again at once, ``then`` what the daemon does with the
task. The backoff outcomes differ only in what they tell the operator, so that a full
disk does not read like a network fault.

The row of an error is that of its class or, failing that, of its nearest ancestor in
the table (most specific first); ``FLError`` itself has a row, so every error has one.
Every class of ``common.errors`` has a row of its own (a unit test checks it), so that
a new class is a decision, not an accident of inheritance. Classes defined elsewhere
(the site's ``TrainerFailed``) join the table with the ``decided`` class decorator,
next to their definition.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from common import errors
from common.errors import FLError

E = TypeVar("E", bound=type[FLError])


class Outcome(enum.Enum):
    RETRY_SEGMENT = "move the segment again now"
    RESUME = "the transfer broke: resume the task after a backoff"
    DISK = "this site's disk failed: try the task again after a backoff, once fixed"
    CONFLICT = "the request clashed with the server's state: try again after a backoff"
    RETRY_TASK = "the task failed: try it again after a backoff"
    GIVE_UP = "the task cannot be done: report it failed to the server, drop it"
    DROP = "the task is gone (its round closed): drop it"
    STOP = "the daemon is stopping: leave the rest of the task to the next start"


class Rule(NamedTuple):
    now: bool  # inside a transfer: move the failed segment again at once
    then: Outcome  # what the daemon does with the task once the error reaches it


RULES: dict[type[FLError], Rule] = {
    FLError: Rule(False, Outcome.RETRY_TASK),
    errors.ConfigError: Rule(False, Outcome.RETRY_TASK),
    errors.RequestError: Rule(False, Outcome.RETRY_TASK),
    errors.NotFound: Rule(False, Outcome.RETRY_TASK),
    errors.Forbidden: Rule(False, Outcome.RETRY_TASK),
    errors.Conflict: Rule(False, Outcome.CONFLICT),
    errors.TaskExpired: Rule(False, Outcome.DROP),
    errors.SegmentBusy: Rule(True, Outcome.CONFLICT),  # another connection still delivers it
    errors.UpdateRejected: Rule(False, Outcome.GIVE_UP),
    errors.SegmentTooLong: Rule(False, Outcome.RETRY_TASK),
    errors.RangeNotSatisfiable: Rule(False, Outcome.RETRY_TASK),
    errors.TooManyRequests: Rule(True, Outcome.RETRY_TASK),
    errors.ServerBusy: Rule(True, Outcome.RETRY_TASK),
    errors.StorageError: Rule(False, Outcome.DISK),  # sending again does not free the disk
    errors.TransferError: Rule(True, Outcome.RESUME),
    errors.TransferTimeout: Rule(True, Outcome.RESUME),
    errors.TlsError: Rule(True, Outcome.RESUME),
    errors.IntegrityError: Rule(True, Outcome.RESUME),
    errors.SegmentTruncated: Rule(True, Outcome.RESUME),
    errors.ResumeMismatch: Rule(False, Outcome.RESUME),  # the same request gets the same answer
    errors.ProtocolError: Rule(False, Outcome.RETRY_TASK),
    errors.ModelFormatError: Rule(False, Outcome.GIVE_UP),
    errors.IllegalTransition: Rule(False, Outcome.CONFLICT),
}


def decided(then: Outcome, *, now: bool = False) -> Callable[[E], E]:
    """Class decorator: the row of an error class defined outside ``common.errors``."""

    def add(cls: E) -> E:
        if cls in RULES:
            raise ValueError(f"{cls.__name__} has a row in the outcome table already")
        RULES[cls] = Rule(now, then)
        return cls

    return add


def rule(err: FLError) -> Rule:
    """The row of ``err``'s class, or of its nearest ancestor that has one."""
    for cls in type(err).__mro__:
        found = RULES.get(cls)
        if found is not None:
            return found
    raise AssertionError("FLError has a row")  # every error is an FLError


def outcome(err: FLError, *, in_transfer: bool = False) -> Outcome:
    """What to do after ``err``: inside a transfer, or once it reaches the daemon."""
    row = rule(err)
    return Outcome.RETRY_SEGMENT if in_transfer and row.now else row.then
