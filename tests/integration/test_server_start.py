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
