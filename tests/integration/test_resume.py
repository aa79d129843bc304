"""Acknowledged segments and resume: a broken transfer costs one segment, not one model.

Clients reach the server through ``tests.proxy``, which breaks, corrupts or slows the
traffic and counts the bytes it forwards. Every job must still end with exactly the
model numpy computes, and the bytes sent again after a fault must stay within one
window of segments.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.cluster import (
    GET_MODEL,
    PUT_SEGMENT,
    Cluster,
    assert_exact_model,
    kill,
    log_text,
    small_job,
    tasks_of,
)
from tests.plugins import runs
from tests.proxy import ProxyProcess, Rule

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
SEGMENT = MIB  # the Cluster's segment_mib is 1
WINDOW = 2
# an HTTP head plus a small JSON body (heartbeat, commit, task reply with its manifest)
OVERHEAD_PER_REQUEST = 4096
SITES = ("site-1", "site-2")


@pytest.fixture
def proxy(cluster: Cluster) -> Iterator[ProxyProcess]:
    p = ProxyProcess.start(cluster.port, cluster.root)
    yield p
    p.stop()


def _client(cluster: Cluster, name: str, proxy: ProxyProcess, **extra: object) -> None:
    cluster.start_client(
        name,
        server_url=proxy.url,
        transfer={"window": WINDOW},
        heartbeat_interval_s=0.5,
        retry_backoff_max_s=1.0,
        **extra,
    )


def _segments(model_bytes: int) -> int:
    return -(-model_bytes // SEGMENT)


def test_upload_cut_mid_segment_resends_only_that_segment(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cut_at = 300_000
    cluster.start_server()
    proxy.set_faults(Rule(match=PUT_SEGMENT, direction="up", cut_after_bytes=cut_at, limit=2))
    for name in SITES:
        _client(cluster, name, proxy)
    rounds = 2
    job_id = cluster.submit(small_job(rounds=rounds, clients=2, tensors=4, shape=[512, 512]))
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    st = proxy.stats()
    assert st.cuts == 2, st
    size = status["job"]["model_bytes"]
    uploads = rounds * len(SITES)
    # each cut segment was sent once more, and nothing else was
    assert st.count(PUT_SEGMENT) == uploads * _segments(size) + st.cuts
    assert uploads * size <= st.bytes_up
    resent = st.bytes_up - uploads * size - st.requests * OVERHEAD_PER_REQUEST
    assert resent <= st.cuts * cut_at <= WINDOW * SEGMENT, (st.bytes_up, st.requests)
    assert_exact_model(cluster, job_id, rounds, [1, 1])


def test_download_cut_mid_segment_refetches_only_that_segment(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cut_at = 200_000
    cluster.start_server()
    proxy.set_faults(Rule(match=GET_MODEL, direction="down", cut_after_bytes=cut_at, limit=2))
    for name in SITES:
        _client(cluster, name, proxy)
    rounds = 2
    job_id = cluster.submit(small_job(rounds=rounds, clients=2, tensors=4, shape=[512, 512]))
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    st = proxy.stats()
    assert st.cuts == 2, st
    size = status["job"]["model_bytes"]
    downloads = rounds * len(SITES)
    assert st.count(GET_MODEL) == downloads * _segments(size) + st.cuts
    assert downloads * size <= st.bytes_down
    refetched = st.bytes_down - downloads * size - st.requests * OVERHEAD_PER_REQUEST
    assert refetched <= st.cuts * cut_at <= WINDOW * SEGMENT, (st.bytes_down, st.requests)
    assert_exact_model(cluster, job_id, rounds, [1, 1])


def test_client_killed_mid_upload_resumes_after_restart(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cluster.start_server()
    # 32 MiB at 8 MiB/s: the upload lasts about 4 s
    proxy.set_faults(Rule(direction="up", throttle_bps=8 * MIB))
    _client(cluster, "site-1", proxy)
    rounds = 2
    runs_file = cluster.root / "runs.txt"
    job = small_job(rounds=rounds, clients=1, tensors=8, shape=[1024, 1024])
    job["trainer"] = {"name": "tests.plugins:count_runs", "params": {"runs_file": str(runs_file)}}
    job_id = cluster.submit(job)

    def uploading() -> bool:
        tasks = tasks_of(cluster.status(job_id), "site-1", 1)
        return bool(tasks) and tasks[0]["phase"] == "uploading" and tasks[0]["bytes_done"] > 0

    cluster.wait_for(uploading, timeout=30, what="site-1 uploading")
    before = tasks_of(cluster.status(job_id), "site-1", 1)[0]
    assert before["bytes_done"] < before["bytes_total"], "upload finished before the kill"
    kill(cluster, "site-1")
    proxy.clear_faults()
    _client(cluster, "site-1", proxy)
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    # the same task was resumed, not replaced, with the update trained before the kill
    (task,) = tasks_of(status, "site-1", 1)
    assert task["task_id"] == before["task_id"] and task["state"] == "committed"
    log = log_text(cluster, "site-1")
    assert re.search(r"upload of task \S+ resumes: server holds [1-9]", log)
    assert "resuming with the update trained before (it matches its record)" in log
    trained = [t["task_id"] for t in status["tasks"]]
    assert runs(runs_file) == [("site-1", t) for t in trained], "a task was trained twice"
    st = proxy.stats()
    size = status["job"]["model_bytes"]
    # the killed client's in-flight segments are all that was sent twice
    assert st.count(PUT_SEGMENT) <= rounds * _segments(size) + WINDOW
    resent = st.bytes_up - rounds * size - st.requests * OVERHEAD_PER_REQUEST
    assert resent <= WINDOW * SEGMENT, (st.bytes_up, st.requests)
    assert_exact_model(cluster, job_id, rounds, [1])


def test_corrupted_segments_are_detected_and_sent_again(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cluster.start_server()
    proxy.set_faults(
        Rule(match=PUT_SEGMENT, direction="up", corrupt_at_byte=1000),
        Rule(match=GET_MODEL, direction="down", corrupt_at_byte=5000),
    )
    _client(cluster, "site-1", proxy)
    rounds = 2
    job_id = cluster.submit(small_job(rounds=rounds, clients=1, tensors=4, shape=[512, 512]))
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    st = proxy.stats()
    assert st.corruptions == 2, st
    server_log = log_text(cluster, "server")
    client_log = log_text(cluster, "site-1")
    # the server refused the bad upload segment, the client the bad download segment
    assert re.search(r"PUT /v1/tasks/\S+/upload/\d+ -> integrity_error: .*digest", server_log)
    assert re.search(r"download of segment \d+ .*digest", client_log), client_log
    segments = _segments(status["job"]["model_bytes"])
    assert st.count(PUT_SEGMENT) == rounds * segments + 1
    assert st.count(GET_MODEL) == rounds * segments + 1
    assert_exact_model(cluster, job_id, rounds, [1])


def test_update_changed_on_disk_while_the_client_was_down_is_trained_again(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cluster.start_server()
    proxy.set_faults(Rule(direction="up", throttle_bps=8 * MIB))
    _client(cluster, "site-1", proxy)
    runs_file = cluster.root / "runs.txt"
    job = small_job(rounds=1, clients=1, tensors=8, shape=[1024, 1024])
    job["trainer"] = {"name": "tests.plugins:count_runs", "params": {"runs_file": str(runs_file)}}
    job_id = cluster.submit(job)

    def uploading() -> bool:
        tasks = tasks_of(cluster.status(job_id), "site-1", 1)
        return bool(tasks) and tasks[0]["phase"] == "uploading" and tasks[0]["bytes_done"] > 0

    cluster.wait_for(uploading, timeout=30, what="site-1 uploading")
    kill(cluster, "site-1")
    (task_id,) = {t for _, t in runs(runs_file)}
    update = cluster.root / "site-1" / "tasks" / task_id / "update.safetensors"
    with open(update, "r+b") as f:  # one flipped bit in the last segment, never sent yet
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 1]))
    proxy.clear_faults()
    _client(cluster, "site-1", proxy)
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    log = log_text(cluster, "site-1")
    assert re.search(
        r"the update trained before cannot be used \(\S+update.safetensors: 1 of \d+ segments "
        r"differ from its record\); training again",
        log,
    ), log
    assert runs(runs_file) == [("site-1", task_id)] * 2
    (task,) = tasks_of(status, "site-1", 1)
    assert task["task_id"] == task_id and task["state"] == "committed"
    assert_exact_model(cluster, job_id, 1, [1])
