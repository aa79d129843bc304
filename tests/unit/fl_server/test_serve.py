"""The server's start-up order, in-process: nothing of the job loops runs, and nothing is
left open, when the port cannot be bound."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from common.config import ServerConfig
from fl_server.app import serve
from fl_server.runner import JobRunner
from fl_server.state import StateDB
from fl_server.workspace import Workspace


async def test_a_port_in_use_fails_the_start_before_any_job_loop_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    closed: list[Path] = []

    async def run(self: JobRunner) -> None:
        started.append("job loops")
        await asyncio.Event().wait()

    close = StateDB.close

    def recording_close(self: StateDB) -> None:
        closed.append(self.path)
        close(self)

    monkeypatch.setattr(JobRunner, "run", run)
    monkeypatch.setattr(StateDB, "close", recording_close)
    workspace = tmp_path / "server"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = ServerConfig(host="127.0.0.1", port=taken.getsockname()[1], workspace=workspace)
        with pytest.raises(OSError, match="Address already in use"):
            await serve(cfg)
    await asyncio.sleep(0.2)  # a job loop started on the way would have run by now
    assert started == []
    assert closed == [workspace / "state.db"]
    os.close(Workspace(workspace).lock())  # and the workspace is free again
