"""Scatter-and-gather decisions, as pure functions over plain values.

Theory of operation. A job runs ``num_rounds`` rounds. A round opens with no tasks;
each eligible client that polls while it is open gets one task (so a client that joins
or comes back late still takes part). A task is *pending* until its update is committed
(verified, durable), rejected, or it expires. ``train_timeout`` is a progress timer per
task: it runs from the task's last sign of progress (issued, bytes moved, training
progress reported), so a slow client that keeps moving is never dropped.

The round closes when no task is pending and at least ``min_clients`` updates are in.
Pending tasks whose timer ran out are expired: if the others reach ``min_clients`` the
round closes with them, otherwise the job fails naming the missing clients. All state
changes go through the transition tables below; an illegal one is a bug and raises.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.errors import Conflict, TaskExpired
from common.wire import JobState, TaskState

JOB_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.ABORTED}),
    JobState.RUNNING: frozenset({JobState.FINISHED, JobState.FAILED, JobState.ABORTED}),
    JobState.FINISHED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.ABORTED: frozenset(),
}


class RoundState(enum.StrEnum):
    """A round takes tasks while ``OPEN``; ``CLOSING`` while its aggregate is computed
    (no task is issued, committed or rejected any more); ``CLOSED`` once the next global
    model is on disk and the job has advanced."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


ROUND_TRANSITIONS: Mapping[RoundState, frozenset[RoundState]] = {
    RoundState.OPEN: frozenset({RoundState.CLOSING}),
    RoundState.CLOSING: frozenset({RoundState.CLOSED}),
    RoundState.CLOSED: frozenset(),
}

TASK_TRANSITIONS: Mapping[TaskState, frozenset[TaskState]] = {
    TaskState.ASSIGNED: frozenset({TaskState.COMMITTED, TaskState.REJECTED, TaskState.EXPIRED}),
    TaskState.COMMITTED: frozenset(),
    TaskState.REJECTED: frozenset(),
    TaskState.EXPIRED: frozenset(),
}

TERMINAL_JOB_STATES = frozenset(s for s, nxt in JOB_TRANSITIONS.items() if not nxt)


def job_predecessors(new: JobState) -> frozenset[JobState]:
    """The states a job may be in to become ``new`` (from ``JOB_TRANSITIONS``)."""
    return frozenset(s for s, nxt in JOB_TRANSITIONS.items() if new in nxt)


def check_job_transition(job_id: str, current: JobState, new: JobState) -> None:
    if new not in JOB_TRANSITIONS[current]:
        raise Conflict(f"job {job_id} is {current.value} and cannot become {new.value}")


def task_write_refusal(
    *,
    task_id: str,
    job_id: str,
    rnd: int,
    state: TaskState,
    reason: str | None,
    round_state: RoundState | None,
    job_state: JobState,
) -> Conflict | None:
    """Why a site may no longer send to this task (upload, commit, fail), or None.

    Only an assigned task of an open round of a running job takes writes.
    """
    if state is TaskState.COMMITTED:
        return Conflict(f"task {task_id} is already committed; nothing more to send")
    if state is TaskState.REJECTED:
        return Conflict(f"task {task_id} was rejected: {reason}")
    if (
        state is TaskState.EXPIRED
        or round_state is not RoundState.OPEN
        or job_state is not JobState.RUNNING
    ):
        return TaskExpired(
            f"task {task_id} (job {job_id}, round {rnd}) has expired: "
            f"{reason or 'its round has closed'}; ask for a new task"
        )
    return None


def check_task_transition(task_id: str, current: TaskState, new: TaskState) -> None:
    if new not in TASK_TRANSITIONS[current]:
        raise Conflict(f"task {task_id} is {current.value} and cannot become {new.value}")


@dataclass(frozen=True)
class TaskView:
    task_id: str
    client: str
    state: TaskState
    last_progress: float
    folded: bool = False


class Action(enum.Enum):
    WAIT = "wait"
    CLOSE = "close"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    action: Action
    expire: tuple[str, ...] = ()
    reason: str | None = None
    wake_at: float | None = None  # when to look again if nothing else happens


def decide_round(
    tasks: Iterable[TaskView],
    *,
    min_clients: int,
    train_timeout: float | None,
    now: float,
    joinable: int = 0,
) -> Decision:
    """What the controller should do with an open round, given its tasks at ``now``.

    ``joinable`` counts live sites the job admits that have no task in this round yet:
    while there are any, a shortfall is not final, they may still take part.
    """
    tasks = list(tasks)
    committed = [t for t in tasks if t.state is TaskState.COMMITTED]
    pending = [t for t in tasks if t.state is TaskState.ASSIGNED]
    timed_out = [
        t for t in pending if train_timeout is not None and now - t.last_progress >= train_timeout
    ]
    live = [t for t in pending if t not in timed_out]
    wake_at = (
        min(t.last_progress + train_timeout for t in live)
        if live and train_timeout is not None
        else None
    )
    if live:
        return Decision(Action.WAIT, wake_at=wake_at)
    expire = tuple(t.task_id for t in timed_out)
    if len(committed) >= min_clients:
        return Decision(Action.CLOSE, expire=expire)
    rejected = [t for t in tasks if t.state is TaskState.REJECTED]
    if (timed_out or rejected) and not joinable:
        got = ", ".join(sorted(t.client for t in committed)) or "none"
        why = []
        if timed_out:
            missing = ", ".join(sorted(t.client for t in timed_out))
            why.append(f"no result within train_timeout={train_timeout:g} s from: {missing}")
        if rejected:
            why.append("rejected: " + ", ".join(sorted(t.client for t in rejected)))
        return Decision(
            Action.FAIL,
            expire=expire,
            reason=(
                f"round needs {min_clients} updates but only {len(committed)} arrived "
                f"(from: {got}); " + "; ".join(why)
            ),
        )
    return Decision(Action.WAIT)


def is_alive(last_seen: float, now: float, gone_after_s: float) -> bool:
    """A site counts as connected while it was heard from within ``gone_after_s``."""
    return now - last_seen <= gone_after_s


def count_joinable(
    alive: Iterable[str], allowed: Iterable[str] | None, round_tasks: Iterable[TaskView]
) -> int:
    tasks = list(round_tasks)
    return sum(may_take_part(c, allowed, tasks) for c in alive)


def may_take_part(
    client: str, allowed: Iterable[str] | None, round_tasks: Iterable[TaskView]
) -> bool:
    """A client gets one task per round, and only if the job admits it."""
    if allowed is not None and client not in set(allowed):
        return False
    return all(t.client != client for t in round_tasks)
