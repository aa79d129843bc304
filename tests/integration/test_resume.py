"""Acknowledged segments and resume: a broken transfer costs one segment, not one model.

Clients reach the server through ``tests.proxy``, which breaks, corrupts or slows the
traffic and counts the bytes it forwards, body bytes per request line among them.
Every job must still end with exactly the model numpy computes, and the bytes sent
again after a fault must stay within what was in flight: at most one window of
segments.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import pytest

from tests.cluster import (
    GET_MODEL,
    PUT_SEGMENT,
    Cluster,
    assert_exact_model,
    in_phase,
    kill,
    log_text,
    small_job,
    start_site,
    tasks_of,
)
from tests.plugins import runs
from tests.proxy import ProxyProcess, Rule

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
SEGMENT = MIB  # the Cluster's segment_mib is 1
WINDOW = 2
SITES = ("site-1", "site-2")


def _client(cluster: Cluster, name: str, proxy: ProxyProcess) -> None:
    start_site(cluster, name, via=proxy.url, transfer={"window": WINDOW})


def _counting_job(cluster: Cluster, **job: Any) -> dict[str, Any]:
    """A job whose trainer notes each run in ``runs.txt`` (``tests.plugins.count_runs``)."""
    runs_file = cluster.root / "runs.txt"
    return {
        **small_job(**job),
        "trainer": {"name": "tests.plugins:count_runs", "params": {"runs_file": str(runs_file)}},
    }


def _segments(model_bytes: int) -> int:
    return -(-model_bytes // SEGMENT)


@pytest.mark.parametrize(
    ("route", "direction", "cut_at"),
    [(PUT_SEGMENT, "up", 300_000), (GET_MODEL, "down", 200_000)],
    ids=["upload", "download"],
)
def test_transfer_cut_mid_segment_moves_only_that_segment_again(
    cluster: Cluster, proxy: ProxyProcess, route: str, direction: Literal["up", "down"], cut_at: int
) -> None:
    cluster.start_server()
    proxy.set_faults(Rule(match=route, direction=direction, cut_after_bytes=cut_at, limit=2))
    for name in SITES:
        _client(cluster, name, proxy)
    rounds = 2
    job_id = cluster.submit(small_job(rounds=rounds, clients=2, tensors=4, shape=[512, 512]))
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    st = proxy.stats()
    assert st.cuts == 2, st
    size = status["job"]["model_bytes"]
    transfers = rounds * len(SITES)
    # each cut segment was moved once more, and nothing else was: the bytes moved twice
    # are what got through before each cut (cut_at counts the message's head too)
    assert st.count(route) == transfers * _segments(size) + st.cuts
    again = st.body(route, direction) - transfers * size
    assert 0 < again < st.cuts * cut_at, again
    assert_exact_model(cluster, job_id, rounds, [1, 1])


def test_client_killed_mid_upload_resumes_after_restart(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cluster.start_server()
    # 32 MiB at 8 MiB/s: the upload lasts about 4 s
    proxy.set_faults(Rule(direction="up", throttle_bps=8 * MIB))
    _client(cluster, "site-1", proxy)
    rounds = 2
    job = _counting_job(cluster, rounds=rounds, clients=1, tensors=8, shape=[1024, 1024])
    job_id = cluster.submit(job)
    cluster.wait_for(
        lambda: in_phase(cluster, job_id, "site-1", "uploading"), 30, "site-1 uploading"
    )
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
    assert runs(cluster.root / "runs.txt") == [("site-1", t) for t in trained], "trained twice"
    st = proxy.stats()
    size = status["job"]["model_bytes"]
    # the killed client's in-flight segments are all that was sent twice
    assert st.count(PUT_SEGMENT) <= rounds * _segments(size) + WINDOW
    resent = st.body(PUT_SEGMENT, "up") - rounds * size
    assert 0 <= resent <= WINDOW * SEGMENT, resent
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
    job_id = cluster.submit(
        _counting_job(cluster, rounds=1, clients=1, tensors=8, shape=[1024, 1024])
    )
    cluster.wait_for(
        lambda: in_phase(cluster, job_id, "site-1", "uploading"), 30, "site-1 uploading"
    )
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


def test_client_killed_mid_download_resumes_from_its_verified_segments(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cluster.start_server()
    # 32 MiB at 4 MiB/s: the download lasts about 8 s
    proxy.set_faults(Rule(match=GET_MODEL, direction="down", throttle_bps=4 * MIB))
    _client(cluster, "site-1", proxy)
    job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=8, shape=[1024, 1024]))
    # more segments verified than can be in flight: a fresh start would refetch them
    done_before = (WINDOW + 2) * SEGMENT
    cluster.wait_for(
        lambda: in_phase(cluster, job_id, "site-1", "downloading", moved=done_before),
        30,
        "site-1 downloading",
    )
    kill(cluster, "site-1")
    proxy.clear_faults()
    _client(cluster, "site-1", proxy)
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    size = status["job"]["model_bytes"]
    m = re.search(
        r"download of model.safetensors resumes: (\d+) of (\d+) segments on disk "
        r"\(checked on disk\)",
        log_text(cluster, "site-1"),
    )
    assert m is not None, log_text(cluster, "site-1")
    assert int(m.group(1)) >= done_before // SEGMENT and int(m.group(2)) == _segments(size)
    # only the segments not verified were fetched again: at most the window in flight
    st = proxy.stats()
    assert st.count(GET_MODEL) <= _segments(size) + WINDOW
    assert 0 <= st.body(GET_MODEL, "down") - size <= WINDOW * SEGMENT
    (task,) = tasks_of(status, "site-1", 1)
    assert task["state"] == "committed"
    assert_exact_model(cluster, job_id, 1, [1])


def test_client_killed_while_training_over_its_model_downloads_it_again(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    """A trainer writing in place has half overwritten the model when the kill comes: the
    model is gone from the task folder (only the unfinished update is left), so the
    restarted site fetches it again rather than train on a half-trained model."""
    cluster.start_server()
    _client(cluster, "site-1", proxy)
    tensor = 4 * MIB  # 1024 x 1024 float32
    trainer = {
        "name": "tests.plugins:slow_add_epsilon",
        "params": {"sleep_s": 0.4, "in_place": True},
    }
    job = {**small_job(rounds=1, clients=1, tensors=8, shape=[1024, 1024]), "trainer": trainer}
    job_id = cluster.submit(job)
    cluster.wait_for(
        lambda: in_phase(cluster, job_id, "site-1", "training", moved=2 * tensor),
        30,
        "site-1 two tensors into training",
    )
    kill(cluster, "site-1")
    (task,) = tasks_of(cluster.status(job_id), "site-1", 1)
    folder = cluster.root / "site-1" / "tasks" / task["task_id"]
    assert sorted(p.name for p in folder.iterdir()) == ["update.safetensors.part"]

    _client(cluster, "site-1", proxy)
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()
    assert log_text(cluster, "site-1").count("model downloaded and verified") == 2
    size = status["job"]["model_bytes"]
    assert proxy.stats().body(GET_MODEL, "down") == 2 * size
    assert_exact_model(cluster, job_id, 1, [1])
