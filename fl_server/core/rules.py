"""Scatter-and-gather rules: who takes part, when a round closes, when a job fails.

Theory of operation. A job runs ``num_rounds`` rounds. A round opens once
``min_clients`` admitted sites are connected; each admitted site that polls while it is
open gets one task (so a site that joins or comes back late still takes part). A task
is *assigned* until its update is committed (verified, durable), rejected, or it
expires. ``train_timeout`` is a progress timer per task: it runs from the task's last
sign of progress (issued, bytes moved, training progress reported), so a slow site that
keeps moving is never dropped.

The round closes when no task is assigned and at least ``min_clients`` updates are in.
Assigned tasks whose timer ran out are expired: if the others reach ``min_clients`` the
round closes with them, otherwise the job fails naming the missing sites. Every reason a
job fails for want of sites is decided here, in ``decide_start`` (before a round opens)
and ``decide_round`` (while it is open); nowhere else.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from common.errors import Conflict, TaskExpired
from common.wire import JobState, TaskState
from fl_server.core.transitions import RoundState


@dataclass(frozen=True)
class TaskView:
    task_id: str
    client: str
    state: TaskState
    last_progress: float


class Action(enum.Enum):
    WAIT = "wait"
    GO = "go"  # a round closes, or opens
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    action: Action
    expire: tuple[str, ...] = ()
    reason: str | None = None
    wake_at: float | None = None  # when to look again if nothing else happens


def decide_start(
    *, connected: int, min_clients: int, waited_s: float, wait_for_clients_s: float | None
) -> Decision:
    """Whether a round may open with ``connected`` admitted sites heard from."""
    if connected >= min_clients:
        return Decision(Action.GO)
    if wait_for_clients_s is not None and waited_s > wait_for_clients_s:
        return Decision(
            Action.FAIL,
            reason=(
                f"only {connected} of min_clients={min_clients} sites connected within "
                f"wait_for_clients_s={wait_for_clients_s:g} s"
            ),
        )
    return Decision(Action.WAIT)


def decide_round(
    tasks: Iterable[TaskView],
    *,
    min_clients: int,
    train_timeout: float | None,
    now: float,
    joinable: int = 0,
    opened_at: float | None = None,
    wait_for_clients_s: float | None = None,
) -> Decision:
    """What to do with an open round, given its tasks at ``now``.

    ``joinable`` counts live sites the job admits that have no task in this round yet:
    while there are any, a shortfall is not final, they may still take part. With
    ``wait_for_clients_s``, a round that has no task in flight and too few updates that
    long after it opened (``opened_at``) fails.
    """
    tasks = list(tasks)
    committed = [t for t in tasks if t.state is TaskState.COMMITTED]
    pending = [t for t in tasks if t.state is TaskState.ASSIGNED]
    timed_out = [
        t for t in pending if train_timeout is not None and now - t.last_progress >= train_timeout
    ]
    live = [t for t in pending if t not in timed_out]
    if live:
        wake_at = (
            min(t.last_progress + train_timeout for t in live)
            if train_timeout is not None
            else None
        )
        return Decision(Action.WAIT, wake_at=wake_at)
    expire = tuple(t.task_id for t in timed_out)
    if len(committed) >= min_clients:
        return Decision(Action.GO, expire=expire)
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
    if wait_for_clients_s is not None and opened_at is not None:
        if now - opened_at > wait_for_clients_s:
            return Decision(
                Action.FAIL,
                expire=expire,
                reason=(
                    f"only {len(committed)} of min_clients={min_clients} clients took part "
                    f"within wait_for_clients_s={wait_for_clients_s:g} s"
                ),
            )
        return Decision(Action.WAIT, expire=expire, wake_at=opened_at + wait_for_clients_s)
    return Decision(Action.WAIT, expire=expire)


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
