"""The whole job with real processes on loopback, checked exactly against numpy."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.cluster import REPO, Cluster, small_job
from tests.expected import expected_after

pytestmark = pytest.mark.integration


def _run_job(
    cluster: Cluster, weights: dict[str, int], **job_extra: Any
) -> tuple[str, dict[str, Any]]:
    cluster.start_server()
    for name, w in weights.items():
        cluster.start_client(name, num_samples=w)
    job_id = cluster.submit(small_job(clients=len(weights), **job_extra))
    status = cluster.wait_job(job_id)
    assert status["job"]["state"] == "finished", cluster.logs()
    return job_id, status


def _check_exact(cluster: Cluster, job_id: str, weights: list[int], rounds: int = 3) -> None:
    initial = load_file(str(cluster.download(job_id, 0, cluster.root / "initial.st")))
    final = load_file(str(cluster.download(job_id, rounds, cluster.root / "final.st")))
    want = expected_after(initial, rounds, weights, 0.001)
    assert sorted(final) == sorted(initial)
    for name in want:
        assert final[name].dtype == np.float32
        assert final[name].shape == initial[name].shape
        np.testing.assert_array_equal(final[name], want[name], err_msg=name)
    # the job really moved the model: it is not the initial one
    assert not np.array_equal(final["layer00000"], initial["layer00000"])


def test_three_rounds_two_clients_exact(cluster: Cluster) -> None:
    job_id, status = _run_job(cluster, {"site-1": 1, "site-2": 1})
    _check_exact(cluster, job_id, [1, 1])
    assert status["job"]["round"] == 3
    assert [r["num_updates"] for r in status["rounds"]] == [2, 2, 2]
    assert {t["client"] for t in status["tasks"]} == {"site-1", "site-2"}
    assert all(t["state"] == "committed" for t in status["tasks"])
    # each site keeps its last update (add_epsilon wrote it over the model) to write
    # the next task over; the server's spares (the spools) are gone with the job
    for site in ("site-1", "site-2"):
        spare = cluster.root / site / "spare"
        cluster.wait_for(
            lambda spare=spare: len(list(spare.iterdir())) == 1, timeout=10, what=f"{spare}"
        )
        assert not list((cluster.root / site / "tasks").iterdir())
    assert not list((cluster.root / "server" / "spare").glob("*"))


def test_unequal_client_weights(cluster: Cluster) -> None:
    job_id, _ = _run_job(cluster, {"site-1": 1, "site-2": 3})
    _check_exact(cluster, job_id, [1, 3])


def test_model_spanning_many_segments_with_odd_tensor_sizes(cluster: Cluster) -> None:
    # 3 tensors of 1,001,001 float32 (~3.8 MiB each) over 1 MiB segments: segment
    # boundaries fall inside tensors and the header sits in segment 0
    job_id, _ = _run_job(
        cluster, {"site-1": 2, "site-2": 5}, rounds=2, tensors=3, shape=[1001, 1001]
    )
    _check_exact(cluster, job_id, [2, 5], rounds=2)


def test_poc_command_prints_ok() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fl_client.admin.poc"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, out.stdout + out.stderr
    assert last.startswith("fl-poc: OK rounds=3"), out.stdout
    assert ", mutual TLS" in out.stdout  # the default
