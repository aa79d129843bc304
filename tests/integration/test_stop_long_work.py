"""Long work stops when it should: a server stopping or a job aborted while the initial
model is written does not wait for it to finish; a job that ends unfinished leaves no
round files behind."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from common.tensorfile import Manifest
from tests.cluster import Cluster, log_text, small_job, tasks_of, wait_log
from tests.rawclient import RawSite, write_update

pytestmark = pytest.mark.integration
# 64 tensors of 4 MiB: writing it takes about a second, long enough to stop it halfway
LARGE = small_job(rounds=1, clients=1, tensors=64, shape=[1024, 1024])
# 256 tensors of 4 MiB, for a test that never lets it finish: a few seconds of writing,
# on a loaded machine too, against the tens of milliseconds an abort takes to arrive
HUGE = small_job(rounds=1, clients=1, tensors=256, shape=[1024, 1024])


def _part(cluster: Cluster, job_id: str) -> Path:
    model = cluster.model_path(job_id, 0)
    return model.with_name(model.name + ".part")


def _wait_generating(cluster: Cluster, job_id: str) -> None:
    part = _part(cluster, job_id)
    cluster.wait_for(part.exists, 30, "the initial model being written")


def test_sigterm_while_the_initial_model_is_written_stops_at_once_and_the_job_resumes(
    cluster: Cluster,
) -> None:
    cluster.start_server()
    job_id = cluster.submit(LARGE)
    _wait_generating(cluster, job_id)
    assert cluster.server is not None
    started = time.monotonic()
    assert cluster.server.stop(signal.SIGTERM, timeout=30) == 0, cluster.server.tail()
    assert time.monotonic() - started < 3.0
    assert "fl-server stopped" in log_text(cluster, "server")
    # stopped halfway, not finished: no partial file, and no model either
    assert not _part(cluster, job_id).exists()
    assert not cluster.model_path(job_id, 0).exists()

    cluster.start_server()
    cluster.start_client("site-1")
    status = cluster.wait_job(job_id, timeout=180)
    assert status["job"]["state"] == "finished", cluster.logs()
    assert cluster.model_path(job_id, 1).exists()


def test_an_abort_while_the_initial_model_is_written_stops_it(cluster: Cluster) -> None:
    cluster.start_server()
    job_id = cluster.submit(HUGE)
    _wait_generating(cluster, job_id)
    cluster.request("POST", f"/v1/admin/jobs/{job_id}/abort")
    # The writing thread removes the partial file, then the job's task logs the stop:
    # the line can come a moment after the file is gone, later still on a busy machine.
    wait_log(cluster, "server", "work in progress stopped by its abort", timeout=30)
    cluster.wait_for(lambda: not _part(cluster, job_id).exists(), 30, "the partial file gone")
    assert not cluster.model_path(job_id, 0).exists()
    assert cluster.status(job_id)["job"]["state"] == "aborted"
    # the server goes on serving
    assert cluster.get("/v1/health") == {"status": "ok"}


@pytest.mark.parametrize("ending", ["aborted", "failed"])
def test_a_job_ended_unfinished_leaves_no_round_files(
    cluster: Cluster, tmp_path: Path, ending: str
) -> None:
    cluster.start_server()
    a = RawSite(cluster.port, "site-a")
    a.hello()
    job = small_job(rounds=2, clients=1, tensors=4)
    if ending == "failed":
        job["train_timeout"] = 2.0  # the update is never committed: the round fails
    job_id = cluster.submit(job)
    task = a.task()
    man = Manifest.model_validate(task["manifest"])
    model = a.download(task, tmp_path / "model.st")
    update = write_update(model, tmp_path / "update.st", man, lambda _, x: x)
    assert all(r.status == 200 for r in a.upload(task["task_id"], update, man.segment_bytes))
    rounds = cluster.root / "server" / "jobs" / job_id / "rounds"
    assert any((rounds / "1" / "spool").iterdir())  # an update of a model's size, held

    if ending == "aborted":
        cluster.request("POST", f"/v1/admin/jobs/{job_id}/abort")
    status = cluster.wait_job(job_id, timeout=30)
    assert status["job"]["state"] == ending, status["job"]
    cluster.wait_for(lambda: not rounds.exists(), 10, "the round files removed")
    (held,) = tasks_of(cluster.status(job_id), "site-a")
    assert held["state"] == "expired"
