"""Daemon lifecycle: clean stop on SIGTERM, and a failing trainer reported, not waited for."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.cluster import Cluster, small_job
from tests.expected import expected_after

pytestmark = pytest.mark.integration


def test_sigterm_stops_server_and_client_with_exit_zero(cluster: Cluster) -> None:
    cluster.start_server()
    client = cluster.start_client("site-1")
    cluster.wait_for(
        lambda: any(c["name"] == "site-1" for c in cluster.get("/v1/admin/clients")),
        what="client registered",
    )
    assert client.stop(signal.SIGTERM, timeout=20) == 0, client.tail()
    assert "stopped" in client.tail()
    assert cluster.server is not None
    assert cluster.server.stop(signal.SIGTERM, timeout=20) == 0, cluster.server.tail()
    assert "fl-server stopped" in cluster.server.tail()


def test_failing_trainer_is_reported_and_round_goes_on(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_client("site-1")
    cluster.start_client("site-2")
    cluster.wait_clients("site-1", "site-2")
    job = small_job(rounds=2, clients=1, tensors=2)
    job["trainer"] = {
        "name": "tests.failing_trainer:factory",
        "params": {"fail_site": "site-2", "epsilon": 0.001},
    }
    job_id = cluster.submit(job)
    status = cluster.wait_job(job_id, timeout=120)
    assert status["job"]["state"] == "finished", cluster.logs()
    rejected = [t for t in status["tasks"] if t["state"] == "rejected"]
    assert rejected and all(t["client"] == "site-2" for t in rejected)
    assert "local data of site-2 is unreadable" in rejected[0]["reason"]
    committed = [t for t in status["tasks"] if t["state"] == "committed"]
    assert {t["client"] for t in committed} == {"site-1"}
    initial = load_file(str(cluster.download(job_id, 0, cluster.root / "i.st")))
    final = load_file(str(cluster.download(job_id, 2, cluster.root / "f.st")))
    want = expected_after(initial, 2, [1], 0.001)
    for name in want:
        np.testing.assert_array_equal(final[name], want[name])


def test_failing_trainer_fails_job_when_quorum_cannot_be_met(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_client("site-1")
    cluster.start_client("site-2")
    cluster.wait_clients("site-1", "site-2")
    job = small_job(rounds=1, clients=2, tensors=2)
    job["trainer"] = {"name": "tests.failing_trainer:factory", "params": {"fail_site": "site-2"}}
    job_id = cluster.submit(job)
    status = cluster.wait_job(job_id, timeout=120)
    assert status["job"]["state"] == "failed"
    assert "rejected: site-2" in status["job"]["reason"]
    assert "needs 2 updates but only 1 arrived" in status["job"]["reason"]
