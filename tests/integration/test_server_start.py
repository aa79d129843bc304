"""Starting and stopping the server as a unit: one server per workspace, and a server
whose job loops died stops with an error."""

from __future__ import annotations

import resource
import time
from typing import Any

import pytest
import yaml

from tests.cluster import Cluster, free_port, log_text, small_job, spawn

pytestmark = pytest.mark.integration


def _second_server(cluster: Cluster, name: str, **cfg: Any) -> Any:
    """Another fl-server process on the cluster's workspace, with its own log."""
    config = {
        "host": "127.0.0.1",
        "port": free_port(),
        "workspace": str(cluster.root / "server"),
        **cfg,
    }
    path = cluster.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return spawn(name, ["-m", "fl_server", "--config", str(path)], cluster.root / f"{name}.log")


def test_a_second_server_on_the_same_workspace_refuses_to_start(cluster: Cluster) -> None:
    cluster.start_server()
    second = _second_server(cluster, "second")
    try:
        second.popen.wait(30)
    finally:
        second.stop()  # never left running, whatever happened
    assert second.popen.returncode == 1
    workspace = cluster.root / "server"
    assert log_text(cluster, "second").splitlines() == [
        f"fl-server: workspace {workspace} is in use by another fl-server (it holds "
        f"{workspace}/server.lock); stop that one or give this one another workspace"
    ]
    # the first one is untouched, and once it is gone the workspace is free again
    assert cluster.get("/v1/health") == {"status": "ok"}
    assert cluster.server is not None and cluster.server.stop() == 0
    cluster.start_server()


def test_job_loops_dying_stop_the_server_with_an_error(cluster: Cluster) -> None:
    cluster.start_server()
    # no site ever connects: after a second the job loop fails the job, which takes a
    # write to the state database
    job_id = cluster.submit(small_job(rounds=1, clients=1, wait_for_clients_s=1.0))
    cluster.wait_for(lambda: cluster.status(job_id)["job"]["state"] == "running")
    # no file of the server may grow any more: the database's next write fails, and so
    # does the write that would record the job as failed
    assert cluster.server is not None
    wal = cluster.root / "server" / "state.db-wal"
    size = wal.stat().st_size
    resource.prlimit(cluster.server.popen.pid, resource.RLIMIT_FSIZE, (size, size))
    started = time.monotonic()
    cluster.server.popen.wait(30)
    assert cluster.server.popen.returncode == 1
    assert time.monotonic() - started < 15
    log = log_text(cluster, "server")
    assert "the job loops stopped on an error: StorageError: state database" in log, log
    assert "stopping the server (exit status 1) so that it is restarted" in log, log
    assert "fl-server stopped after its job loops failed" in log, log
    assert "Traceback" not in log, log


def _start_fails(cluster: Cluster, name: str) -> str:
    """Start a server on the cluster's workspace that must refuse; its one-line reason."""
    proc = _second_server(cluster, name)
    try:
        proc.popen.wait(30)
    finally:
        proc.stop()
    assert proc.popen.returncode == 1, log_text(cluster, name)
    return log_text(cluster, name)


def test_a_missing_or_damaged_state_database_stops_the_server_at_start(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_client("site-1")
    job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=2))
    assert cluster.wait_job(job_id, timeout=60)["job"]["state"] == "finished", cluster.logs()
    cluster.stop_all()
    db = cluster.root / "server" / "state.db"
    saved = db.read_bytes()

    db.unlink()
    for extra in ("state.db-wal", "state.db-shm"):
        (cluster.root / "server" / extra).unlink(missing_ok=True)
    said = _start_fails(cluster, "missing")
    assert f"state database {db} is missing but {cluster.root / 'server' / 'jobs'}" in said, said
    assert job_id in said and "restore state.db from a backup" in said, said
    assert not db.exists()  # nothing was created in its place

    # damage in the middle of the file: pages of the tables, not the header
    damaged = bytearray(saved)
    assert len(damaged) >= 3 * 4096, len(damaged)
    damaged[4096 : 4096 * 2] = b"\xa5" * 4096
    db.write_bytes(bytes(damaged))
    said = _start_fails(cluster, "damaged")
    assert f"state database {db}" in said and "restore it from a backup" in said, said
    assert "Traceback" not in said, said

    # the real file back: the server starts and has the job
    db.write_bytes(saved)
    cluster.start_server()
    assert cluster.status(job_id)["job"]["state"] == "finished"


def test_an_unusable_workspace_is_named_not_the_port(cluster: Cluster) -> None:
    (cluster.root / "server").write_text("a file where the workspace should be\n")
    said = _start_fails(cluster, "unusable")
    assert f"workspace {cluster.root / 'server'}" in said, said
    assert "cannot serve on" not in said, said
