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
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from common.errors import NotFound, StorageError
from common.wire import JobState, Phase, TaskState
from fl_server.core.rules import task_write_refusal
from fl_server.core.transitions import (
    JOBS,
    ROUNDS,
    TASKS,
    JobEvent,
    RoundEvent,
    RoundState,
    TaskEvent,
)
from fl_server.records import (
    ROUND_COLUMNS,
    SCHEMA,
    ClientRow,
    JobRow,
    RoundRow,
    TaskRow,
    check_moved,
    in_states,
    job_row,
    round_row,
    task_row,
)

__all__ = ["ClientRow", "JobRow", "RoundRow", "StateDB", "TaskRow"]

P = ParamSpec("P")
T = TypeVar("T")


def _no_job(job_id: str) -> NotFound:
    return NotFound(f"no job with id {job_id!r} (see 'fl-admin list')", field="job_id")


def _no_task(task_id: str) -> NotFound:
    return NotFound(f"no task with id {task_id!r}", field="task_id")


DAMAGED_WAY_OUT = (
    "restore it from a backup, or move it (and the jobs folder beside it) away to start "
    "with no jobs"
)


class StateDB:
    """The server's state; a failing database (disk full, I/O error, corrupt file) is a
    ``StorageError`` naming the file: ``sqlite3`` errors never get past this class."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        with self._storage(DAMAGED_WAY_OUT):
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            # damage anywhere in the file, found now rather than when a request reads it
            problems = [str(r[0]) for r in self._conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                self._conn.close()
                raise StorageError(
                    f"state database {path} is damaged ({'; '.join(problems)}); " + DAMAGED_WAY_OUT
                )
            self._conn.executescript(SCHEMA)

    @classmethod
    def open_checked(cls, path: Path, jobs_dir: Path) -> StateDB:
        """Open the server's database, refusing a missing one while the workspace holds
        jobs: starting empty would hide them (and their sites) without a word."""
        if not path.exists() and jobs_dir.is_dir():
            held = sorted(d.name for d in jobs_dir.iterdir() if not d.name.startswith("."))
            if held:
                raise StorageError(
                    f"state database {path} is missing but {jobs_dir} holds the folders of "
                    f"{len(held)} jobs ({', '.join(held[:3])}{' ...' if len(held) > 3 else ''}); "
                    "restore state.db from a backup, or move the jobs folder away to start "
                    "with no jobs"
                )
        return cls(path)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def close(self) -> None:
        with self._lock, self._storage():
            self._conn.close()

    @contextmanager
    def _storage(self, way_out: str = "") -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            hint = f"; {way_out}" if way_out else ""
            raise StorageError(f"state database {self.path}: {exc}{hint}") from exc

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
        return job_row(row)

    def list_jobs(self) -> list[JobRow]:
        return [job_row(r) for r in self._all("SELECT * FROM jobs ORDER BY created_at")]

    def set_job_state(self, job_id: str, event: JobEvent, reason: str | None, now: float) -> None:
        """Move the job by ``event`` if ``JOBS`` allows it from where it is now, checked
        and written in one transaction; else ``IllegalTransition`` naming its state."""
        where, before = in_states(JOBS.sources(event))
        with self._tx() as c:
            cur = c.execute(
                "UPDATE jobs SET state = ?, reason = COALESCE(?, reason), updated_at = ? "
                f"WHERE job_id = ? AND state {where}",
                (JOBS.target(event).value, reason, now, job_id, *before),
            )
            check_moved(
                cur,
                c,
                JOBS,
                "SELECT state FROM jobs WHERE job_id = ?",
                (job_id,),
                job_id,
                event,
                JobState,
                lambda: _no_job(job_id),
            )

    def delete_job(self, job_id: str) -> None:
        """Forget the job: its row, its rounds, its tasks and their segments."""
        with self._tx() as c:
            c.execute(
                "DELETE FROM segments WHERE task_id IN "
                "(SELECT task_id FROM tasks WHERE job_id = ?)",
                (job_id,),
            )
            c.execute("DELETE FROM tasks WHERE job_id = ?", (job_id,))
            c.execute("DELETE FROM rounds WHERE job_id = ?", (job_id,))
            c.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

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
        row = self._one(
            f"SELECT {ROUND_COLUMNS} FROM rounds WHERE job_id = ? AND round = ?", job_id, rnd
        )
        return None if row is None else round_row(row)

    def list_rounds(self, job_id: str) -> list[RoundRow]:
        rows = self._all(
            f"SELECT {ROUND_COLUMNS} FROM rounds WHERE job_id = ? ORDER BY round", job_id
        )
        return [round_row(r) for r in rows]

    def _move_round(
        self, c: sqlite3.Connection, job_id: str, rnd: int, event: RoundEvent, now: float
    ) -> None:
        where, before = in_states(ROUNDS.sources(event))
        new = ROUNDS.target(event)
        cur = c.execute(
            "UPDATE rounds SET state = ?, closed_at = CASE WHEN ? THEN ? ELSE closed_at END "
            f"WHERE job_id = ? AND round = ? AND state {where}",
            (new.value, new is RoundState.CLOSED, now, job_id, rnd, *before),
        )
        check_moved(
            cur,
            c,
            ROUNDS,
            "SELECT state FROM rounds WHERE job_id = ? AND round = ?",
            (job_id, rnd),
            f"{rnd} of job {job_id}",
            event,
            RoundState,
            lambda: NotFound(f"job {job_id} has no round {rnd}", field="round"),
        )

    def begin_closing(self, job_id: str, rnd: int, now: float) -> None:
        """Stop the round taking tasks, commits and rejections while its aggregate is made."""
        with self._tx() as c:
            self._move_round(c, job_id, rnd, RoundEvent.BEGIN_CLOSING, now)

    def close_round(self, job_id: str, rnd: int, now: float) -> None:
        """Close the round, expire its tasks still assigned (issued after the decision to
        close) and advance the job, in one transaction: never redone."""
        where, before = in_states(TASKS.sources(TaskEvent.EXPIRE))
        with self._tx() as c:
            self._move_round(c, job_id, rnd, RoundEvent.CLOSE, now)
            c.execute(
                "UPDATE tasks SET state = ?, reason = COALESCE(reason, 'round closed') "
                f"WHERE job_id = ? AND round = ? AND state {where}",
                (TASKS.target(TaskEvent.EXPIRE).value, job_id, rnd, *before),
            )
            c.execute(
                "UPDATE jobs SET round_done = ?, updated_at = ? WHERE job_id = ?",
                (rnd, now, job_id),
            )

    def expire_tasks(self, task_ids: list[str], reason: str) -> None:
        """Expire those of the tasks still assigned: one the site committed or failed
        meanwhile keeps what it became."""
        where, before = in_states(TASKS.sources(TaskEvent.EXPIRE))
        with self._tx() as c:
            for task_id in task_ids:
                c.execute(
                    f"UPDATE tasks SET state = ?, reason = ? WHERE task_id = ? AND state {where}",
                    (TASKS.target(TaskEvent.EXPIRE).value, reason, task_id, *before),
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
        return task_row(row)

    def round_tasks(self, job_id: str, rnd: int) -> list[TaskRow]:
        rows = self._all(
            "SELECT * FROM tasks WHERE job_id = ? AND round = ? ORDER BY created_at", job_id, rnd
        )
        return [task_row(r) for r in rows]

    def job_tasks(self, job_id: str) -> list[TaskRow]:
        rows = self._all("SELECT * FROM tasks WHERE job_id = ? ORDER BY round, created_at", job_id)
        return [task_row(r) for r in rows]

    def assigned_tasks_of(self, client: str) -> list[TaskRow]:
        rows = self._all(
            "SELECT * FROM tasks WHERE client = ? AND state = ? ORDER BY created_at",
            client,
            TaskState.ASSIGNED.value,
        )
        return [task_row(r) for r in rows]

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

    def _check_task_moved(
        self, cur: sqlite3.Cursor, c: sqlite3.Connection, task_id: str, event: TaskEvent
    ) -> None:
        check_moved(
            cur,
            c,
            TASKS,
            "SELECT state FROM tasks WHERE task_id = ?",
            (task_id,),
            task_id,
            event,
            TaskState,
            lambda: _no_task(task_id),
        )

    def reject_task(self, task_id: str, reason: str, now: float) -> None:
        """Reject an open task (the site cannot deliver); else the refusal is raised."""
        with self._tx() as c:
            self._check_writable(c, task_id)
            where, before = in_states(TASKS.sources(TaskEvent.REJECT))
            cur = c.execute(
                "UPDATE tasks SET state = ?, reason = ?, last_progress = ? "
                f"WHERE task_id = ? AND state {where}",
                (TASKS.target(TaskEvent.REJECT).value, reason, now, task_id, *before),
            )
            self._check_task_moved(cur, c, task_id, TaskEvent.REJECT)
            c.execute("DELETE FROM segments WHERE task_id = ?", (task_id,))

    def commit_task(
        self, task_id: str, num_samples: int, metrics: dict[str, float], digest: str, now: float
    ) -> None:
        """Commit an open task's update; else the refusal is raised and nothing changes."""
        with self._tx() as c:
            self._check_writable(c, task_id)
            where, before = in_states(TASKS.sources(TaskEvent.COMMIT))
            cur = c.execute(
                "UPDATE tasks SET state = ?, num_samples = ?, metrics = ?, digest = ?, "
                f"phase = ?, last_progress = ?, reason = NULL WHERE task_id = ? AND state {where}",
                (
                    TASKS.target(TaskEvent.COMMIT).value,
                    num_samples,
                    json.dumps(metrics),
                    digest,
                    Phase.DONE.value,
                    now,
                    task_id,
                    *before,
                ),
            )
            self._check_task_moved(cur, c, task_id, TaskEvent.COMMIT)

    def mark_folded(self, task_id: str) -> None:
        """Record that the task's update is in the round's running sum (its spool may be
        gone: the sum replaces it), and forget its segments."""
        with self._tx() as c:
            c.execute("UPDATE tasks SET folded = 1 WHERE task_id = ?", (task_id,))
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
