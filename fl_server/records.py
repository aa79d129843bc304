"""The rows of the server's state database, its schema, and the compare-and-set
helpers that write state changes through their tables.

Plain frozen values: what ``StateDB`` reads is handed around the server as these.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from common.wire import JobState, Phase, TaskState
from fl_server.core.round_events import TaskInfo
from fl_server.core.rules import TaskView
from fl_server.core.transitions import RoundState, Transitions

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, name TEXT NOT NULL, config TEXT NOT NULL, state TEXT NOT NULL,
    round_done INTEGER NOT NULL DEFAULT 0, reason TEXT, model_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL,
    started_at REAL NOT NULL, closed_at REAL, PRIMARY KEY (job_id, round));
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, round INTEGER NOT NULL,
    client TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
    last_progress REAL NOT NULL, phase TEXT NOT NULL DEFAULT 'idle',
    bytes_done INTEGER NOT NULL DEFAULT 0, bytes_total INTEGER NOT NULL DEFAULT 0,
    num_samples INTEGER, metrics TEXT, digest TEXT, folded INTEGER NOT NULL DEFAULT 0,
    reason TEXT, UNIQUE (job_id, round, client));
CREATE TABLE IF NOT EXISTS segments (
    task_id TEXT NOT NULL, idx INTEGER NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (task_id, idx));
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    phase TEXT NOT NULL DEFAULT 'idle', task_id TEXT);
"""


@dataclass(frozen=True)
class JobRow:
    job_id: str
    name: str
    config: str
    state: JobState
    round_done: int
    reason: str | None
    model_bytes: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RoundRow:
    job_id: str
    round: int
    state: RoundState
    started_at: float
    closed_at: float | None


@dataclass(frozen=True)
class TaskRow:
    task_id: str
    job_id: str
    round: int
    client: str
    state: TaskState
    created_at: float
    last_progress: float
    phase: Phase
    bytes_done: int
    bytes_total: int
    num_samples: int | None
    metrics: str | None
    digest: str | None
    folded: bool
    reason: str | None

    def info(self) -> TaskInfo:
        """What the round core knows of the task."""
        weight = None if self.num_samples is None else float(self.num_samples)
        return TaskInfo(
            self.task_id, self.client, self.state, self.last_progress, weight, self.folded
        )

    def view(self) -> TaskView:
        """What the round rules look at."""
        return TaskView(self.task_id, self.client, self.state, self.last_progress)


@dataclass(frozen=True)
class ClientRow:
    name: str
    first_seen: float
    last_seen: float
    phase: Phase
    task_id: str | None


def job_row(r: sqlite3.Row) -> JobRow:
    d = dict(r)
    d["state"] = JobState(d["state"])
    return JobRow(**d)


def round_row(r: sqlite3.Row) -> RoundRow:
    d = dict(r)
    d["state"] = RoundState(d["state"])
    return RoundRow(**d)


def task_row(r: sqlite3.Row) -> TaskRow:
    d = dict(r)
    d["state"] = TaskState(d["state"])
    d["phase"] = Phase(d["phase"])
    d["folded"] = bool(d["folded"])
    return TaskRow(**d)


# the columns of RoundRow: databases written before some columns were dropped still
# have them
ROUND_COLUMNS = "job_id, round, state, started_at, closed_at"


S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


def in_states(states: tuple[enum.Enum, ...]) -> tuple[str, tuple[str, ...]]:
    """``IN (?, ...)`` and its values: the states a table lets take an event."""
    return f"IN ({', '.join('?' * len(states))})", tuple(s.value for s in states)


def check_moved(
    cur: sqlite3.Cursor,
    c: sqlite3.Connection,
    table: Transitions[S, E],
    sql: str,
    key: tuple[Any, ...],
    subject: str,
    event: E,
    state_type: Callable[[str], S],
    missing: Callable[[], Exception],
) -> None:
    """After a compare-and-set update: if it matched no row, raise why (the subject is
    gone, or its state does not take ``event``: ``IllegalTransition``)."""
    if cur.rowcount:
        return
    row = c.execute(sql, key).fetchone()
    if row is None:
        raise missing()
    table.next(subject, state_type(row["state"]), event)
    raise AssertionError(f"{subject}: UPDATE matched no row")  # unreachable
