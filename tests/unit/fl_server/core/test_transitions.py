"""The job, round and task tables: what each event does from each state."""

from __future__ import annotations

import pytest

from common.errors import Conflict, IllegalTransition
from common.wire import JobState, TaskState
from fl_server.core.transitions import (
    JOBS,
    ROUNDS,
    TASKS,
    TERMINAL_JOB_STATES,
    JobEvent,
    RoundEvent,
    RoundState,
    TaskEvent,
)


def test_a_job_starts_then_finishes_fails_or_is_aborted() -> None:
    assert JOBS.next("j1", JobState.PENDING, JobEvent.START) is JobState.RUNNING
    assert JOBS.next("j1", JobState.RUNNING, JobEvent.FINISH) is JobState.FINISHED
    for state in (JobState.PENDING, JobState.RUNNING):
        assert JOBS.next("j1", state, JobEvent.FAIL) is JobState.FAILED
        assert JOBS.next("j1", state, JobEvent.ABORT) is JobState.ABORTED
    assert {JobState.FINISHED, JobState.FAILED, JobState.ABORTED} == TERMINAL_JOB_STATES
    assert JOBS.sources(JobEvent.ABORT) == (JobState.PENDING, JobState.RUNNING)
    assert JOBS.target(JobEvent.ABORT) is JobState.ABORTED


@pytest.mark.parametrize("state", sorted(TERMINAL_JOB_STATES))
@pytest.mark.parametrize("event", list(JobEvent))
def test_an_ended_job_takes_no_event_and_the_error_names_state_and_event(
    state: JobState, event: JobEvent
) -> None:
    assert not JOBS.allows(state, event)
    with pytest.raises(IllegalTransition) as err:
        JOBS.next("j1", state, event)
    assert err.value.message == f"job j1 is {state.value} and cannot {event.value}"
    assert isinstance(err.value, Conflict) and err.value.http_status == 409


def test_a_pending_job_cannot_finish() -> None:
    with pytest.raises(IllegalTransition, match="job j1 is pending and cannot finish"):
        JOBS.next("j1", JobState.PENDING, JobEvent.FINISH)


def test_a_round_closes_only_through_closing() -> None:
    assert ROUNDS.next("1", RoundState.OPEN, RoundEvent.BEGIN_CLOSING) is RoundState.CLOSING
    assert ROUNDS.next("1", RoundState.CLOSING, RoundEvent.CLOSE) is RoundState.CLOSED
    with pytest.raises(IllegalTransition, match="round 1 is open and cannot close"):
        ROUNDS.next("1", RoundState.OPEN, RoundEvent.CLOSE)
    with pytest.raises(IllegalTransition, match="round 1 is closed and cannot begin closing"):
        ROUNDS.next("1", RoundState.CLOSED, RoundEvent.BEGIN_CLOSING)
    assert ROUNDS.terminal() == {RoundState.CLOSED}


@pytest.mark.parametrize(
    ("event", "state"),
    [
        (TaskEvent.COMMIT, TaskState.COMMITTED),
        (TaskEvent.REJECT, TaskState.REJECTED),
        (TaskEvent.EXPIRE, TaskState.EXPIRED),
    ],
)
def test_only_an_assigned_task_moves(event: TaskEvent, state: TaskState) -> None:
    assert TASKS.next("t1", TaskState.ASSIGNED, event) is state
    for done in (TaskState.COMMITTED, TaskState.REJECTED, TaskState.EXPIRED):
        with pytest.raises(IllegalTransition, match=f"task t1 is {done.value} and cannot"):
            TASKS.next("t1", done, event)
