"""Durable job state in an embedded SQLite database (blocking: call through ``run``).

WAL mode with ``synchronous=NORMAL``: a committed transaction survives a killed
process, which is the failure the server must ride out. Every method is one
transaction under one lock, so the async side can call them from worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from common.errors import NotFound, StorageError
from common.wire import JobState, Phase, TaskState
from fl_server.controller import (
    RoundState,
    check_job_transition,
    job_predecessors,
    task_write_refusal,
)

P = ParamSpec("P")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, name TEXT NOT NULL, config TEXT NOT NULL, state TEXT NOT NULL,
    round_done INTEGER NOT NULL DEFAULT 0, reason TEXT, model_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL,
    started_at REAL NOT NULL, closed_at REAL, folded INTEGER NOT NULL DEFAULT 0,
    total_weight REAL NOT NULL DEFAULT 0, PRIMARY KEY (job_id, round));
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
    folded: int
    total_weight: float


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


@dataclass(frozen=True)
class ClientRow:
    name: str
    first_seen: float
    last_seen: float
    phase: Phase
    task_id: str | None


def _job(r: sqlite3.Row) -> JobRow:
    d = dict(r)
    d["state"] = JobState(d["state"])
    return JobRow(**d)


def _round(r: sqlite3.Row) -> RoundRow:
    d = dict(r)
    d["state"] = RoundState(d["state"])
    return RoundRow(**d)


def _task(r: sqlite3.Row) -> TaskRow:
    d = dict(r)
    d["state"] = TaskState(d["state"])
    d["phase"] = Phase(d["phase"])
    d["folded"] = bool(d["folded"])
    return TaskRow(**d)


def _no_job(job_id: str) -> NotFound:
    return NotFound(f"no job with id {job_id!r} (see 'fl-admin list')", field="job_id")


def _no_task(task_id: str) -> NotFound:
    return NotFound(f"no task with id {task_id!r}", field="task_id")


class StateDB:
    """The server's state; a failing database (disk full, I/O error, corrupt file) is a
    ``StorageError`` naming the file: ``sqlite3`` errors never get past this class."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        with self._storage():
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def close(self) -> None:
        with self._lock, self._storage():
            self._conn.close()

    @contextmanager
    def _storage(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StorageError(f"state database {self.path}: {exc}") from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._storage():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # also when COMMIT itself failed: a transaction left open would make
                # every later BEGIN fail
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise

    def _one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        with self._lock, self._storage():
            row: sqlite3.Row | None = self._conn.execute(sql, args).fetchone()
            return row

    def _all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock, self._storage():
            return list(self._conn.execute(sql, args).fetchall())

    # jobs
    def insert_job(self, job_id: str, name: str, config: str, now: float) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO jobs (job_id, name, config, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, name, config, JobState.PENDING.value, now, now),
            )

    def get_job(self, job_id: str) -> JobRow:
        row = self._one("SELECT * FROM jobs WHERE job_id = ?", job_id)
        if row is None:
            raise _no_job(job_id)
        return _job(row)

    def list_jobs(self) -> list[JobRow]:
        return [_job(r) for r in self._all("SELECT * FROM jobs ORDER BY created_at")]

    def set_job_state(self, job_id: str, state: JobState, reason: str | None, now: float) -> None:
        """Move the job to ``state`` if ``JOB_TRANSITIONS`` allows it from where it is now,
        checked and written in one transaction; else ``Conflict`` naming its actual state."""
        before = sorted(s.value for s in job_predecessors(state))
        with self._tx() as c:
            cur = c.execute(
                "UPDATE jobs SET state = ?, reason = COALESCE(?, reason), updated_at = ? "
                f"WHERE job_id = ? AND state IN ({', '.join('?' * len(before))})",
                (state.value, reason, now, job_id, *before),
            )
            if cur.rowcount == 0:
                row = c.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                if row is None:
                    raise _no_job(job_id)
                check_job_transition(job_id, JobState(row["state"]), state)
                raise AssertionError(f"job {job_id}: UPDATE matched no row")  # unreachable

    def set_model_bytes(self, job_id: str, nbytes: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET model_bytes = ? WHERE job_id = ?", (nbytes, job_id))

    # rounds
    def open_round(self, job_id: str, rnd: int, now: float) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO rounds (job_id, round, state, started_at) "
                "VALUES (?, ?, ?, ?)",
                (job_id, rnd, RoundState.OPEN.value, now),
            )

    def get_round(self, job_id: str, rnd: int) -> RoundRow | None:
        row = self._one("SELECT * FROM rounds WHERE job_id = ? AND round = ?", job_id, rnd)
        return None if row is None else _round(row)

    def list_rounds(self, job_id: str) -> list[RoundRow]:
        rows = self._all("SELECT * FROM rounds WHERE job_id = ? ORDER BY round", job_id)
        return [_round(r) for r in rows]

    def begin_closing(self, job_id: str, rnd: int) -> None:
        """Stop the round taking tasks, commits and rejections while its aggregate is made.

        Idempotent: a round found closing after a restart stays closing.
        """
        with self._tx() as c:
            c.execute(
                "UPDATE rounds SET state = ? WHERE job_id = ? AND round = ? AND state = ?",
                (RoundState.CLOSING.value, job_id, rnd, RoundState.OPEN.value),
            )

    def close_round(self, job_id: str, rnd: int, expire: list[str], now: float) -> None:
        """Close the round and advance the job in one transaction: never redone."""
        with self._tx() as c:
            for task_id in expire:
                c.execute(
                    "UPDATE tasks SET state = ?, reason = ? WHERE task_id = ? AND state = ?",
                    (
                        TaskState.EXPIRED.value,
                        "no result within train_timeout",
                        task_id,
                        TaskState.ASSIGNED.value,
                    ),
                )
            c.execute(
                "UPDATE tasks SET state = ?, reason = COALESCE(reason, 'round closed') "
                "WHERE job_id = ? AND round = ? AND state = ?",
                (TaskState.EXPIRED.value, job_id, rnd, TaskState.ASSIGNED.value),
            )
            c.execute(
                "UPDATE rounds SET state = ?, closed_at = ? WHERE job_id = ? AND round = ?",
                (RoundState.CLOSED.value, now, job_id, rnd),
            )
            c.execute(
                "UPDATE jobs SET round_done = ?, updated_at = ? WHERE job_id = ?",
                (rnd, now, job_id),
            )

    def expire_tasks(self, task_ids: list[str], reason: str) -> None:
        with self._tx() as c:
            for task_id in task_ids:
                c.execute(
                    "UPDATE tasks SET state = ?, reason = ? WHERE task_id = ? AND state = ?",
                    (TaskState.EXPIRED.value, reason, task_id, TaskState.ASSIGNED.value),
                )

    # tasks
    def create_task(self, task_id: str, job_id: str, rnd: int, client: str, now: float) -> bool:
        """Issue a task, if the round is still open and its job running; else False."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO tasks (task_id, job_id, round, client, state, created_at, "
                "last_progress) SELECT ?, ?, ?, ?, ?, ?, ? FROM rounds r "
                "JOIN jobs j ON j.job_id = r.job_id "
                "WHERE r.job_id = ? AND r.round = ? AND r.state = ? AND j.state = ?",
                (
                    task_id,
                    job_id,
                    rnd,
                    client,
                    TaskState.ASSIGNED.value,
                    now,
                    now,
                    job_id,
                    rnd,
                    RoundState.OPEN.value,
                    JobState.RUNNING.value,
                ),
            )
            return cur.rowcount == 1

    def get_task(self, task_id: str) -> TaskRow:
        row = self._one("SELECT * FROM tasks WHERE task_id = ?", task_id)
        if row is None:
            raise _no_task(task_id)
        return _task(row)

    def round_tasks(self, job_id: str, rnd: int) -> list[TaskRow]:
        rows = self._all(
            "SELECT * FROM tasks WHERE job_id = ? AND round = ? ORDER BY created_at", job_id, rnd
        )
        return [_task(r) for r in rows]

    def job_tasks(self, job_id: str) -> list[TaskRow]:
        rows = self._all("SELECT * FROM tasks WHERE job_id = ? ORDER BY round, created_at", job_id)
        return [_task(r) for r in rows]

    def assigned_tasks_of(self, client: str) -> list[TaskRow]:
        rows = self._all(
            "SELECT * FROM tasks WHERE client = ? AND state = ? ORDER BY created_at",
            client,
            TaskState.ASSIGNED.value,
        )
        return [_task(r) for r in rows]

    def touch_task(
        self, task_id: str, now: float, phase: Phase | None, done: int | None, total: int | None
    ) -> None:
        """Record progress. Within one phase ``bytes_done`` never goes back: a heartbeat
        the site sent before a segment's acknowledgement reached it can arrive after the
        server counted that segment, and must not undo the count."""
        value = None if phase is None else phase.value
        with self._tx() as c:
            # SET expressions see the row as it was before this UPDATE
            c.execute(
                "UPDATE tasks SET last_progress = ?, phase = COALESCE(?, phase), "
                "bytes_done = CASE WHEN ? IS NULL THEN bytes_done "
                "WHEN COALESCE(?, phase) = phase THEN MAX(bytes_done, ?) ELSE ? END, "
                "bytes_total = COALESCE(?, bytes_total) WHERE task_id = ?",
                (now, value, done, value, done, done, total, task_id),
            )

    def _check_writable(self, c: sqlite3.Connection, task_id: str) -> None:
        """Raise why the task takes no more writes (see ``task_write_refusal``), if so.

        Called inside the transaction that writes, so that the check and the write see
        the same state: a task the controller expired, or a round that began closing,
        can never be committed, rejected or sent to after the fact.
        """
        row = c.execute(
            "SELECT t.state, t.reason, t.job_id, t.round, r.state AS round_state, "
            "j.state AS job_state FROM tasks t JOIN jobs j ON j.job_id = t.job_id "
            "LEFT JOIN rounds r ON r.job_id = t.job_id AND r.round = t.round "
            "WHERE t.task_id = ?",
            (task_id,),
        ).fetchone()
        if row is None:
            raise _no_task(task_id)
        refusal = task_write_refusal(
            task_id=task_id,
            job_id=row["job_id"],
            rnd=row["round"],
            state=TaskState(row["state"]),
            reason=row["reason"],
            round_state=None if row["round_state"] is None else RoundState(row["round_state"]),
            job_state=JobState(row["job_state"]),
        )
        if refusal is not None:
            raise refusal

    def reject_task(self, task_id: str, reason: str, now: float) -> None:
        """Reject an open task (the site cannot deliver); else the refusal is raised."""
        with self._tx() as c:
            self._check_writable(c, task_id)
            c.execute(
                "UPDATE tasks SET state = ?, reason = ?, last_progress = ? WHERE task_id = ?",
                (TaskState.REJECTED.value, reason, now, task_id),
            )
            c.execute("DELETE FROM segments WHERE task_id = ?", (task_id,))

    def commit_task(
        self, task_id: str, num_samples: int, metrics: dict[str, float], digest: str, now: float
    ) -> None:
        """Commit an open task's update; else the refusal is raised and nothing changes."""
        with self._tx() as c:
            self._check_writable(c, task_id)
            c.execute(
                "UPDATE tasks SET state = ?, num_samples = ?, metrics = ?, digest = ?, "
                "phase = ?, last_progress = ?, reason = NULL WHERE task_id = ?",
                (
                    TaskState.COMMITTED.value,
                    num_samples,
                    json.dumps(metrics),
                    digest,
                    Phase.DONE.value,
                    now,
                    task_id,
                ),
            )

    def mark_folded(self, task_id: str, job_id: str, rnd: int, folded: int, weight: float) -> None:
        """Record one fold: the task, the round's fold count and weight, in one transaction."""
        with self._tx() as c:
            c.execute("UPDATE tasks SET folded = 1 WHERE task_id = ?", (task_id,))
            c.execute(
                "UPDATE rounds SET folded = ?, total_weight = total_weight + ? "
                "WHERE job_id = ? AND round = ?",
                (folded, weight, job_id, rnd),
            )
            c.execute("DELETE FROM segments WHERE task_id = ?", (task_id,))

    # upload segments
    def add_segment(self, task_id: str, idx: int, digest: str) -> int:
        """Record a received segment of an open task; return how many it now holds."""
        with self._tx() as c:
            self._check_writable(c, task_id)
            c.execute(
                "INSERT OR REPLACE INTO segments (task_id, idx, digest) VALUES (?, ?, ?)",
                (task_id, idx, digest),
            )
            row = c.execute("SELECT COUNT(*) FROM segments WHERE task_id = ?", (task_id,))
            return int(row.fetchone()[0])

    def open_task_segments(self, task_id: str) -> dict[int, str]:
        """The segments an open task holds; raises the refusal if it takes no more writes.

        One transaction: a segment missing here cannot be committed by anyone else
        before it is written, so writing it can never touch an update already counted.
        """
        with self._tx() as c:
            self._check_writable(c, task_id)
            rows = c.execute("SELECT idx, digest FROM segments WHERE task_id = ?", (task_id,))
            return {int(r["idx"]): str(r["digest"]) for r in rows}

    def segments_of(self, task_id: str) -> dict[int, str]:
        rows = self._all("SELECT idx, digest FROM segments WHERE task_id = ?", task_id)
        return {int(r["idx"]): str(r["digest"]) for r in rows}

    # clients
    def touch_client(self, name: str, now: float, phase: Phase | None, task_id: str | None) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO clients (name, first_seen, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET last_seen = excluded.last_seen",
                (name, now, now),
            )
            if phase is not None:
                c.execute(
                    "UPDATE clients SET phase = ?, task_id = ? WHERE name = ?",
                    (phase.value, task_id, name),
                )

    def list_clients(self) -> list[ClientRow]:
        rows = self._all("SELECT * FROM clients ORDER BY name")
        out = []
        for r in rows:
            d = dict(r)
            d["phase"] = Phase(d["phase"])
            out.append(ClientRow(**d))
        return out
