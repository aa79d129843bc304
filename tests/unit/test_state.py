"""The state database, on a real SQLite file in a temporary directory."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import StorageError
from common.wire import JobState
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
        db.set_job_state("j1", JobState.RUNNING, None, NOW + 1)
    db._conn.set_authorizer(None)
    # the failed transaction was rolled back, and the next one goes through
    assert db.get_job("j1").state is JobState.PENDING
    db.set_job_state("j1", JobState.RUNNING, None, NOW + 2)
    assert db.get_job("j1").state is JobState.RUNNING
    assert StateDB(tmp_path / "state.db").get_job("j1").state is JobState.RUNNING


def test_an_unreadable_database_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match=r"state database .*state\.db: file is not a database"):
        StateDB(path)
