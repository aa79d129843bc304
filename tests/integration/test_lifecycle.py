"""Daemon lifecycle: clean stop on SIGTERM, and a failing trainer reported, not waited for."""

from __future__ import annotations

import re
import signal
import time
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.cluster import (
    PUT_SEGMENT,
    Cluster,
    assert_exact_model,
    in_phase,
    log_text,
    small_job,
    tasks_of,
)
from tests.expected import expected_after
from tests.proxy import ProxyProcess, Rule

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


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
        "name": "tests.plugins:fail_on_site",
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
    job["trainer"] = {"name": "tests.plugins:fail_on_site", "params": {"fail_site": "site-2"}}
    job_id = cluster.submit(job)
    status = cluster.wait_job(job_id, timeout=120)
    assert status["job"]["state"] == "failed"
    assert "rejected: site-2" in status["job"]["reason"]
    assert "needs 2 updates but only 1 arrived" in status["job"]["reason"]


@pytest.mark.parametrize(
    ("plugin", "words"),
    [
        (
            "tests.plugins:broken_factory",
            "could not be set up: RuntimeError('licence server lic.invalid unreachable')",
        ),
        ("tests.no_such_plugin:factory", "No module named 'tests.no_such_plugin'"),
    ],
)
def test_trainer_that_cannot_be_set_up_is_reported_and_the_site_goes_on(
    cluster: Cluster, plugin: str, words: str
) -> None:
    cluster.start_server()
    # the site allows the plugin: what fails is loading it, not the site's policy
    client = cluster.start_client("site-1", heartbeat_interval_s=0.5, allowed_trainers=[plugin])
    job = small_job(rounds=1, clients=1, tensors=2)
    job["trainer"] = {"name": plugin, "params": {}}
    job_id = cluster.submit(job)
    status = cluster.wait_job(job_id, timeout=60)
    (task,) = tasks_of(status, "site-1")
    assert task["state"] == "rejected", cluster.logs()
    assert f"trainer {plugin!r}" in task["reason"] and words in task["reason"], task
    assert status["job"]["state"] == "failed"
    assert "rejected: site-1" in status["job"]["reason"]
    log = log_text(cluster, "site-1")
    assert "Traceback" not in log, log
    assert "model downloaded" not in log  # found out before fetching the model
    # the daemon lives on and takes the next job
    assert client.alive(), log
    job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=2))
    assert cluster.wait_job(job_id, timeout=60)["job"]["state"] == "finished", cluster.logs()


def test_sigterm_while_the_plugin_computes_without_progress_stops_in_time(
    cluster: Cluster,
) -> None:
    # the plugin sits in one long computation (until the test removes the file), never
    # calling ctx.progress, which is where it would learn that the daemon is stopping
    hold = cluster.root / "hold"
    hold.touch()
    shutdown_timeout_s = 1.0
    settings: dict[str, Any] = {
        "heartbeat_interval_s": 0.3,
        "shutdown_timeout_s": shutdown_timeout_s,
    }
    cluster.start_server()
    client = cluster.start_client("site-1", **settings)
    job = small_job(rounds=1, clients=1, tensors=2)
    job["trainer"] = {
        "name": "tests.plugins:slow_add_epsilon",
        "params": {"sleep_s": 0.0, "hold_file": str(hold)},
    }
    job_id = cluster.submit(job)

    cluster.wait_for(
        lambda: in_phase(cluster, job_id, "site-1", "training", moved=0), 30, "site-1 training"
    )
    started = time.monotonic()
    assert client.stop(signal.SIGTERM, timeout=20) == 0, client.tail()
    assert time.monotonic() - started < shutdown_timeout_s + 3.0
    log = log_text(cluster, "site-1")
    assert "training has not stopped after 1 s" in log and "fl-client site-1 stopped" in log

    hold.unlink()
    cluster.start_client("site-1", **settings)
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()
    (task,) = tasks_of(status, "site-1", 1)
    assert task["state"] == "committed"
    assert_exact_model(cluster, job_id, 1, [1])


# SIGTERM in the middle of a transfer: the daemon stops cleanly and nothing is lost.


def test_client_sigterm_mid_upload_finishes_its_segments_and_resumes(cluster: Cluster) -> None:
    cluster.start_server()
    with ProxyProcess.start(cluster.port, cluster.root) as proxy:
        # 8 MiB of update at 2 MiB/s: about 4 s of upload, segments of 1 MiB
        proxy.set_faults(Rule(match=PUT_SEGMENT, direction="up", throttle_bps=2 * MIB))
        settings: dict[str, Any] = {
            "server_url": proxy.url,
            "heartbeat_interval_s": 0.3,
            "transfer": {"window": 2},
        }
        client = cluster.start_client("site-1", **settings)
        job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=8, shape=[512, 512]))
        cluster.wait_for(
            lambda: in_phase(cluster, job_id, "site-1", "uploading"), 30, "site-1 uploading"
        )
        assert client.stop(signal.SIGTERM, timeout=20) == 0, client.tail()
        log = log_text(cluster, "site-1")
        assert re.search(r"task \S+ paused: \d+ segments left for the next start", log), log
        held = tasks_of(cluster.status(job_id), "site-1", 1)[0]["bytes_done"]
        assert 0 < held < 8 * MIB
        # no segment was cut off mid-body by the stop: the server saw none closed early
        assert "connection closed after" not in log_text(cluster, "server")

        proxy.clear_faults()
        cluster.start_client("site-1", **settings)
        status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()
    assert re.search(r"upload of task \S+ resumes: server holds [1-9]", log_text(cluster, "site-1"))
    (task,) = tasks_of(status, "site-1", 1)
    assert task["state"] == "committed"
    assert_exact_model(cluster, job_id, 1, [1])


def test_server_sigterm_mid_upload_exits_zero_and_the_job_goes_on(cluster: Cluster) -> None:
    cluster.server_extra["shutdown_timeout_s"] = 1.0
    cluster.start_server()
    with ProxyProcess.start(cluster.port, cluster.root) as proxy:
        proxy.set_faults(Rule(match=PUT_SEGMENT, direction="up", throttle_bps=2 * MIB))
        cluster.start_client(
            "site-1", server_url=proxy.url, heartbeat_interval_s=0.3, retry_backoff_max_s=0.5
        )
        job_id = cluster.submit(small_job(rounds=2, clients=1, tensors=8, shape=[512, 512]))
        cluster.wait_for(
            lambda: in_phase(cluster, job_id, "site-1", "uploading"), 30, "site-1 uploading"
        )
        # The segments of a window share the throttle and end together (about 2 s each);
        # the first window is in, so the next one is now mid-body for a while.
        time.sleep(0.7)
        assert cluster.server is not None
        started = time.monotonic()
        assert cluster.server.stop(signal.SIGTERM, timeout=20) == 0, cluster.server.tail()
        assert time.monotonic() - started < 10
        server_log = log_text(cluster, "server")
        assert "fl-server stopped" in server_log
        # the segments cut off by the stop were not acknowledged
        assert re.search(r"connection closed after \d+ of \d+ bytes; not acknowledged", server_log)
        proxy.clear_faults()
        cluster.start_server()
        status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()
    assert [t["state"] for t in tasks_of(status, "site-1")] == ["committed", "committed"]
    assert_exact_model(cluster, job_id, 2, [1])
