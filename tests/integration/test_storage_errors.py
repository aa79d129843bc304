"""A disk that refuses writes is named, with the file and the reason, not an internal error.

The server's file size limit (RLIMIT_FSIZE, set on the running process) stands in for a
full disk: a write past it fails with EFBIG, as one past the end of the disk would with
ENOSPC. The state database stays far below the limit.
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from common.tensorfile import Manifest
from tests.cluster import Cluster, small_job
from tests.rawclient import RawSite, file_segments, write_update

pytestmark = pytest.mark.integration
MIB = 1024 * 1024
MODEL_16_MIB = small_job(rounds=1, clients=1, tensors=4, shape=[1024, 1024])


def _limit_file_size(cluster: Cluster, nbytes: int) -> None:
    assert cluster.server is not None
    resource.prlimit(cluster.server.popen.pid, resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_a_refused_initial_model_fails_the_job_naming_the_file(cluster: Cluster) -> None:
    cluster.start_server()
    _limit_file_size(cluster, 4 * MIB)
    job_id = cluster.submit(MODEL_16_MIB)
    status = cluster.wait_job(job_id, timeout=30)
    assert status["job"]["state"] == "failed"
    reason = status["job"]["reason"]
    assert "initial model" in reason and "cannot write" in reason, reason
    assert f"jobs/{job_id}/models/round-0.safetensors" in reason, reason
    assert "File too large" in reason and "internal error" not in reason, reason
    assert list(cluster.model_path(job_id, 0).parent.iterdir()) == []
    assert cluster.get("/v1/health") == {"status": "ok"}


def test_a_refused_spool_file_is_a_507_naming_it(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_server()
    a = RawSite(cluster.port, "site-a")
    a.hello()
    cluster.submit(MODEL_16_MIB)
    task = a.task(wait_s=60)
    man = Manifest.model_validate(task["manifest"])
    model = a.download(task, tmp_path / "model.st")
    update = write_update(model, tmp_path / "update.st", man, lambda _, x: x)
    _limit_file_size(cluster, 4 * MIB)  # the spool is made the update's size: 16 MiB
    i, data, digest = next(file_segments(update, man.segment_bytes))
    reply = a.put_segment(task["task_id"], i, data, digest)
    assert reply.status == 507 and reply.code == "storage_error", reply
    assert f"spool/{task['task_id']}.safetensors" in reply.message, reply
    assert "File too large" in reply.message, reply
