"""The state database, on a real SQLite file in a temporary directory."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import Conflict, IllegalTransition, NotFound, StorageError, TaskExpired
from common.wire import JobState, Phase, TaskState
from fl_server.core.transitions import JobEvent, RoundState
from fl_server.state import StateDB

NOW = 1000.0


@pytest.fixture
def db(tmp_path: Path) -> Iterator[StateDB]:
    state = StateDB(tmp_path / "state.db")
    yield state
    state.close()


def _deny_commit(action: int, arg1: Any, *rest: Any) -> int:
    if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def test_a_failed_commit_is_a_storage_error_and_leaves_no_transaction_open(
    db: StateDB, tmp_path: Path
) -> None:
    db.insert_job("j1", "job", "{}", NOW)
    db._conn.set_authorizer(_deny_commit)  # COMMIT fails as a full disk would make it
    with pytest.raises(StorageError, match=r"state database .*state\.db: not authorized"):
        db.set_job_state("j1", JobEvent.START, None, NOW + 1)
    db._conn.set_authorizer(None)
    # the failed transaction was rolled back, and the next one goes through
    assert db.get_job("j1").state is JobState.PENDING
    db.set_job_state("j1", JobEvent.START, None, NOW + 2)
    assert db.get_job("j1").state is JobState.RUNNING
    assert StateDB(tmp_path / "state.db").get_job("j1").state is JobState.RUNNING


def test_an_unreadable_database_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match=r"state database .*state\.db: file is not a database"):
        StateDB(path)


# Writes to a task, a round or a job are checked in the transaction that makes them.


def _running_round(db: StateDB, *clients: str) -> list[str]:
    db.insert_job("j1", "job", "{}", NOW)
    db.set_job_state("j1", JobEvent.START, None, NOW)
    db.open_round("j1", 1, NOW)
    ids = [f"t-{c}" for c in clients]
    for task_id, client in zip(ids, clients, strict=True):
        assert db.create_task(task_id, "j1", 1, client, NOW)
    return ids


def test_an_expired_task_is_never_committed(db: StateDB) -> None:
    (t,) = _running_round(db, "a")
    db.add_segment(t, 0, "d0")
    db.expire_tasks([t], "no result within train_timeout")  # the controller's decision
    with pytest.raises(TaskExpired, match="no result within train_timeout; ask for a new task"):
        db.commit_task(t, 5, {}, "digest", NOW + 1)
    task = db.get_task(t)
    assert task.state is TaskState.EXPIRED and task.num_samples is None
    with pytest.raises(TaskExpired):
        db.add_segment(t, 1, "d1")
    with pytest.raises(TaskExpired):
        db.reject_task(t, "site reported: disk full", NOW + 1)
    assert db.segments_of(t) == {0: "d0"}
    assert db.get_task(t).state is TaskState.EXPIRED


def test_a_closing_round_takes_no_task_commit_rejection_or_segment(db: StateDB) -> None:
    a, b = _running_round(db, "a", "b")
    db.begin_closing("j1", 1, NOW + 1)
    assert db.get_round("j1", 1).state is RoundState.CLOSING  # type: ignore[union-attr]
    assert not db.create_task("t-c", "j1", 1, "c", NOW)
    with pytest.raises(NotFound):
        db.get_task("t-c")
    with pytest.raises(TaskExpired, match="its round has closed"):
        db.commit_task(a, 5, {}, "digest", NOW + 1)
    with pytest.raises(TaskExpired):
        db.reject_task(b, "site reported: no data", NOW + 1)
    with pytest.raises(TaskExpired):
        db.add_segment(a, 0, "d0")
    with pytest.raises(TaskExpired):
        db.open_task_segments(a)
    assert [t.state for t in db.round_tasks("j1", 1)] == [TaskState.ASSIGNED] * 2
    with pytest.raises(IllegalTransition, match="round 1 of job j1 is closing and cannot begin"):
        db.begin_closing("j1", 1, NOW + 2)
    db.close_round("j1", 1, NOW + 2)
    with pytest.raises(IllegalTransition, match="round 1 of job j1 is closed and cannot close"):
        db.close_round("j1", 1, NOW + 3)
    assert db.get_round("j1", 1).state is RoundState.CLOSED  # type: ignore[union-attr]
    assert [t.state for t in db.round_tasks("j1", 1)] == [TaskState.EXPIRED] * 2
    assert db.get_job("j1").round_done == 1


def test_tasks_of_an_aborted_job_take_no_writes(db: StateDB) -> None:
    (t,) = _running_round(db, "a")
    db.set_job_state("j1", JobEvent.ABORT, "aborted by admin", NOW + 1)
    with pytest.raises(TaskExpired):
        db.commit_task(t, 1, {}, "digest", NOW + 2)
    assert not db.create_task("t-b", "j1", 1, "b", NOW + 2)


def test_a_committed_or_rejected_task_stays_so(db: StateDB) -> None:
    a, b = _running_round(db, "a", "b")
    db.commit_task(a, 3, {"loss": 0.5}, "digest", NOW + 1)
    with pytest.raises(Conflict, match="already committed") as err:
        db.reject_task(a, "site reported: late failure", NOW + 2)
    assert not isinstance(err.value, TaskExpired)
    db.reject_task(b, "site reported: no data", NOW + 1)
    with pytest.raises(Conflict, match="was rejected: site reported: no data"):
        db.commit_task(b, 3, {}, "digest", NOW + 2)
    assert db.get_task(a).state is TaskState.COMMITTED and db.get_task(a).num_samples == 3
    assert db.get_task(b).state is TaskState.REJECTED


@pytest.mark.parametrize(
    ("path", "refused", "actual"),
    [
        ([JobEvent.ABORT], JobEvent.START, "aborted"),
        ([JobEvent.START, JobEvent.FINISH], JobEvent.ABORT, "finished"),
        ([JobEvent.START, JobEvent.ABORT], JobEvent.FAIL, "aborted"),
        ([JobEvent.START], JobEvent.START, "running"),
    ],
)
def test_a_job_moves_only_along_its_transitions(
    db: StateDB, path: list[JobEvent], refused: JobEvent, actual: str
) -> None:
    db.insert_job("j1", "job", "{}", NOW)
    for event in path:
        db.set_job_state("j1", event, f"by {event.value}", NOW)
    with pytest.raises(IllegalTransition, match=f"job j1 is {actual} and cannot {refused.value}"):
        db.set_job_state("j1", refused, "lost the race", NOW + 1)
    job = db.get_job("j1")
    assert job.state.value == actual and job.reason == f"by {path[-1].value}"


def test_an_unknown_job_is_not_found(db: StateDB) -> None:
    with pytest.raises(NotFound, match="no job with id 'nope'"):
        db.set_job_state("nope", JobEvent.ABORT, None, NOW)


def test_progress_never_goes_back_within_a_phase(db: StateDB) -> None:
    (t,) = _running_round(db, "a")
    mib = 1024 * 1024
    db.touch_task(t, NOW + 1, Phase.UPLOADING, 0, 8 * mib)
    db.touch_task(t, NOW + 2, Phase.UPLOADING, 2 * mib, 8 * mib)  # two segments counted
    db.touch_task(t, NOW + 3, Phase.UPLOADING, 1 * mib, 8 * mib)  # a heartbeat sent earlier
    task = db.get_task(t)
    assert (task.phase, task.bytes_done, task.last_progress) == (Phase.UPLOADING, 2 * mib, NOW + 3)
    db.touch_task(t, NOW + 4, None, None, None)  # no figures: kept
    assert db.get_task(t).bytes_done == 2 * mib
    db.touch_task(t, NOW + 5, Phase.DONE, 0, 0)  # a new phase counts from its own start
    assert (db.get_task(t).phase, db.get_task(t).bytes_done) == (Phase.DONE, 0)


def test_a_database_with_the_dropped_round_columns_still_opens_and_runs(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE rounds (job_id TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL, "
        "started_at REAL NOT NULL, closed_at REAL, folded INTEGER NOT NULL DEFAULT 0, "
        "total_weight REAL NOT NULL DEFAULT 0, PRIMARY KEY (job_id, round))"
    )
    old.commit()
    old.close()
    db = StateDB(path)
    (a,) = _running_round(db, "a")
    db.commit_task(a, 2, {}, "digest", NOW + 1)
    db.mark_folded(a)
    db.begin_closing("j1", 1, NOW + 2)
    db.close_round("j1", 1, NOW + 3)
    (rnd,) = db.list_rounds("j1")
    assert (rnd.state, rnd.closed_at) == (RoundState.CLOSED, NOW + 3)
    assert db.get_task(a).folded and db.segments_of(a) == {}
    db.close()
