"""What runs and what is read is decided by whoever owns the machine: a site runs only the
trainer plugins its config allows, and a server reads model files only under its
``model_dirs``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from common.modelio import ModelWriter
from tests.cluster import ApiError, Cluster, log_text, small_job, tasks_of

MARKER_PLUGIN = "tests.marker_plugin:factory"


def test_a_trainer_the_site_does_not_allow_is_refused_and_never_imported(
    cluster: Cluster,
) -> None:
    marker = cluster.root / "imported"
    env = {**os.environ, "FL_TEST_IMPORT_MARKER": str(marker)}
    cluster.start_server()
    cluster.start_client("site-1", env=env, heartbeat_interval_s=0.5)
    job = small_job(rounds=1, clients=1, tensors=2)
    job["trainer"] = {"name": MARKER_PLUGIN, "params": {}}
    job_id = cluster.submit(job)
    status = cluster.wait_job(job_id, timeout=60)
    (task,) = tasks_of(status, "site-1")
    assert task["state"] == "rejected", cluster.logs()
    assert f"trainer {MARKER_PLUGIN!r} is not allowed on this site" in task["reason"], task
    assert "allowed_trainers" in task["reason"]
    assert status["job"]["state"] == "failed"
    assert "rejected: site-1" in status["job"]["reason"]
    assert not marker.exists(), marker.read_text()
    assert "model downloaded" not in log_text(cluster, "site-1")  # refused before the model

    # the same site, once its operator lists the plugin, runs it: the mark is real
    cluster.clients["site-1"].stop()
    cluster.start_client(
        "site-1", env=env, heartbeat_interval_s=0.5, allowed_trainers=[MARKER_PLUGIN]
    )
    job_id = cluster.submit(job)
    assert cluster.wait_job(job_id, timeout=60)["job"]["state"] == "finished", cluster.logs()
    assert marker.exists()


def _model(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with ModelWriter(path, [("w", "F32", (64, 8))], segment_bytes=1 << 20) as w:
        w.write(np.arange(512, dtype=np.float32))
        w.finish()
    return path


def test_a_model_file_outside_the_model_dirs_is_refused_at_submit(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_client("site-1")
    outside = _model(cluster.root / "elsewhere" / "model.safetensors")
    secret = cluster.root / "server" / "state.db"  # any file the server can read
    link = cluster.root / "server" / "models" / "link.safetensors"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)
    for path in (outside, secret, link):
        job = small_job(rounds=1, clients=1, model={"kind": "file", "path": str(path)})
        with pytest.raises(ApiError) as err:
            cluster.submit(job)
        assert err.value.status == 403, err.value.body
        assert err.value.body["field"] == "model.path"
        assert "is not under the server's model_dirs" in err.value.body["message"]
        assert "SQLite" not in str(err.value.body)
    assert cluster.get("/v1/admin/jobs") == []

    # a model under the workspace's models/ folder, named by a path relative to it
    inside = _model(cluster.root / "server" / "models" / "init.safetensors")
    job = small_job(rounds=1, clients=1, model={"kind": "file", "path": "init.safetensors"})
    job_id = cluster.submit(job)
    assert cluster.wait_job(job_id, timeout=60)["job"]["state"] == "finished", cluster.logs()
    initial = cluster.download(job_id, 0, cluster.root / "initial.st")
    assert initial.read_bytes() == inside.read_bytes()
