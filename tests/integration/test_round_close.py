"""A round being aggregated takes no new tasks, and closes again after a server crash."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.tensorfile import Manifest
from tests.cluster import Cluster, assert_exact_model, kill, log_text, small_job, tasks_of
from tests.rawclient import RawSite, file_digest, write_update

pytestmark = pytest.mark.integration
EPSILON = 0.001


def test_a_closing_round_issues_no_task_and_is_closed_again_after_a_crash(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.segment_mib = 8
    # small aggregation chunks: the next global model (128 MiB) takes a while to write
    cluster.server_extra["aggregation_chunk_mib"] = 1
    cluster.start_server()
    a, b = RawSite(cluster.port, "site-a"), RawSite(cluster.port, "site-b")
    a.hello()
    b.hello()
    job_id = cluster.submit(
        small_job(rounds=1, clients=1, tensors=32, shape=[1024, 1024], epsilon=EPSILON)
    )
    task = a.task(wait_s=60)
    man = Manifest.model_validate(task["manifest"])
    model = a.download(task, tmp_path / "model.st")
    update = write_update(
        model, tmp_path / "update.st", man, lambda _, x: x + x.dtype.type(EPSILON)
    )
    assert all(r.status == 200 for r in a.upload(task["task_id"], update, man.segment_bytes))
    assert a.commit(task["task_id"], file_digest(update, man.segment_bytes)).status == 200

    # the quorum (one update) is in: the round's aggregate is being written
    part = cluster.model_path(job_id, 1).with_name("round-1.safetensors.part")
    deadline = time.monotonic() + 30
    while not part.exists():
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.005)
    reply = b.request("GET", "/v1/clients/site-b/task?wait=0")
    assert reply.status == 200 and reply.body["task"] is None, reply
    # the server dies mid-aggregation
    kill(cluster, "server")
    assert not cluster.model_path(job_id, 1).exists(), "aggregation ended before the kill"

    cluster.start_server()
    reply = b.request("GET", "/v1/clients/site-b/task?wait=0")
    assert reply.status == 200 and reply.body["task"] is None, reply
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()
    assert "round 1: closing again after a restart" in log_text(cluster, "server")
    assert tasks_of(status, "site-b") == []
    assert [t["state"] for t in tasks_of(status, "site-a")] == ["committed"]
    assert_exact_model(cluster, job_id, 1, [1], EPSILON)
