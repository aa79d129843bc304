"""The job, round and task state machines: one table each, keyed by (state, event).

Every state change in the server goes through one of these tables. The database writes
them as compare-and-set updates (``UPDATE ... WHERE state IN table.sources(event)``),
which keeps concurrent requests safe; when such an update matches nothing, the table
names what went wrong (``common.errors.IllegalTransition``: the state the subject is in
and the event it cannot take). The round core checks its own round state against the same table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

from common.errors import IllegalTransition
from common.wire import JobState, TaskState


class RoundState(enum.StrEnum):
    """A round takes tasks while ``OPEN``; ``CLOSING`` while its aggregate is computed
    (no task is issued, committed or rejected any more); ``CLOSED`` once the next global
    model is on disk and the job has advanced."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class JobEvent(enum.StrEnum):
    START = "start"  # the initial model is ready: rounds may run
    FINISH = "finish"  # the last round closed
    FAIL = "fail"
    ABORT = "abort"


class RoundEvent(enum.StrEnum):
    BEGIN_CLOSING = "begin closing"  # its quorum is in: no more tasks, commits, rejections
    CLOSE = "close"  # the next global model is on disk


class TaskEvent(enum.StrEnum):
    COMMIT = "commit"
    REJECT = "reject"
    EXPIRE = "expire"


S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class Transitions(Generic[S, E]):
    """A state machine's table: which event takes which state where."""

    def __init__(self, kind: str, table: Mapping[tuple[S, E], S]) -> None:
        self.kind = kind
        self._table = dict(table)

    def allows(self, state: S, event: E) -> bool:
        return (state, event) in self._table

    def next(self, subject: str, state: S, event: E) -> S:
        """The state ``event`` leads to from ``state``; ``IllegalTransition`` if none."""
        new = self._table.get((state, event))
        if new is None:
            raise IllegalTransition(
                f"{self.kind} {subject} is {state.value} and cannot {event.value}",
                field="state",
            )
        return new

    def sources(self, event: E) -> tuple[S, ...]:
        """The states that take ``event``, in a fixed order (for ``WHERE state IN``)."""
        return tuple(sorted({s for s, e in self._table if e == event}, key=lambda s: s.value))

    def target(self, event: E) -> S:
        """The one state ``event`` leads to (every table here has one per event)."""
        targets = {new for (_, e), new in self._table.items() if e == event}
        assert len(targets) == 1, f"{self.kind}: {event} leads to {targets}"
        return targets.pop()

    def terminal(self) -> frozenset[S]:
        """The states no event leaves."""
        leaving = {s for s, _ in self._table}
        return frozenset(new for new in self._table.values() if new not in leaving)


JOBS: Transitions[JobState, JobEvent] = Transitions(
    "job",
    {
        (JobState.PENDING, JobEvent.START): JobState.RUNNING,
        (JobState.PENDING, JobEvent.FAIL): JobState.FAILED,
        (JobState.PENDING, JobEvent.ABORT): JobState.ABORTED,
        (JobState.RUNNING, JobEvent.FINISH): JobState.FINISHED,
        (JobState.RUNNING, JobEvent.FAIL): JobState.FAILED,
        (JobState.RUNNING, JobEvent.ABORT): JobState.ABORTED,
    },
)

ROUNDS: Transitions[RoundState, RoundEvent] = Transitions(
    "round",
    {
        (RoundState.OPEN, RoundEvent.BEGIN_CLOSING): RoundState.CLOSING,
        (RoundState.CLOSING, RoundEvent.CLOSE): RoundState.CLOSED,
    },
)

TASKS: Transitions[TaskState, TaskEvent] = Transitions(
    "task",
    {
        (TaskState.ASSIGNED, TaskEvent.COMMIT): TaskState.COMMITTED,
        (TaskState.ASSIGNED, TaskEvent.REJECT): TaskState.REJECTED,
        (TaskState.ASSIGNED, TaskEvent.EXPIRE): TaskState.EXPIRED,
    },
)

TERMINAL_JOB_STATES = JOBS.terminal()
