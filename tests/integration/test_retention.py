"""A job's models on the server's disk: which are kept, deleting a job, and a job that
cannot fit refused at submit."""

from __future__ import annotations

import pytest

from tests.cluster import ApiError, Cluster, fl_admin, small_job


def _models(cluster: Cluster, job_id: str) -> list[str]:
    folder = cluster.root / "server" / "jobs" / job_id / "models"
    return sorted(p.name for p in folder.iterdir())


def test_a_job_keeps_what_its_keep_setting_says_and_delete_removes_it_all(
    cluster: Cluster,
) -> None:
    cluster.start_server()
    cluster.start_client("site-1")
    job_id = cluster.submit(small_job(rounds=4, clients=1, tensors=2))
    # refused while it runs (or waits): an admin aborts first
    with pytest.raises(ApiError) as err:
        cluster.request("DELETE", f"/v1/admin/jobs/{job_id}")
    assert err.value.status == 409 and "abort it first" in err.value.body["message"]
    assert cluster.wait_job(job_id, timeout=120)["job"]["state"] == "finished", cluster.logs()
    # the default: the initial model, one round before the final one, the final one
    assert _models(cluster, job_id) == [
        f"round-{r}.{kind}" for r in (0, 3, 4) for kind in ("manifest.json", "safetensors")
    ]
    with pytest.raises(ApiError) as err:
        cluster.request("GET", f"/v1/admin/jobs/{job_id}/model?round=2")
    assert err.value.status == 404
    assert "did not keep the global model of round 2" in err.value.body["message"]
    assert cluster.download(job_id, 4, cluster.root / "final.st").stat().st_size > 0

    every = small_job(
        rounds=4, clients=1, tensors=2, keep={"initial": False, "last": 0, "every": 2}
    )
    other = cluster.submit(every)
    assert cluster.wait_job(other, timeout=120)["job"]["state"] == "finished", cluster.logs()
    assert _models(cluster, other) == [
        f"round-{r}.{kind}" for r in (2, 4) for kind in ("manifest.json", "safetensors")
    ]

    done = fl_admin("--server", cluster.url, "delete", job_id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"job {job_id}: deleted"
    assert not (cluster.root / "server" / "jobs" / job_id).exists()
    with pytest.raises(ApiError) as err:
        cluster.status(job_id)
    assert err.value.status == 404
    assert [j["job_id"] for j in cluster.get("/v1/admin/jobs")] == [other]  # the other stays
    assert _models(cluster, other)


def test_a_job_that_cannot_fit_the_disk_is_refused_at_submit_with_the_numbers(
    cluster: Cluster,
) -> None:
    cluster.start_server()
    huge = small_job(rounds=3, clients=2)
    huge["model"] = {"kind": "generated", "num_tensors": 100_000, "tensor_mib": 1024}
    with pytest.raises(ApiError) as err:
        cluster.submit(huge)
    assert err.value.status == 507, err.value.body
    message = err.value.body["message"]
    assert "needs up to" in message and "free" in message and "keep:" in message, message
    assert cluster.get("/v1/admin/jobs") == []
    assert not (cluster.root / "server" / "jobs").exists() or not any(
        (cluster.root / "server" / "jobs").iterdir()
    )
