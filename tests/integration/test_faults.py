"""Slow is not dead: progress timeouts, stalls, dead clients and a dead server.

Clients reach the server through ``tests.proxy`` where a test slows or stalls the
traffic. Timeouts are 1 s so that every check stays fast; a transfer that keeps moving
must outlive them many times over, one that stops must fail within about one of them.
"""

from __future__ import annotations

import http.client
import itertools
import os
import re
import resource
import signal
import time
from typing import Any

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
    wait_log,
)
from tests.proxy import ProxyProcess, ProxyThread, Rule

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
TIMEOUTS = {
    "communication_timeout": TIMEOUT_S,
    "streaming_ack_wait": TIMEOUT_S,
    "streaming_read_timeout": TIMEOUT_S,
}
STAGE_WORDS = ("sending", "waiting", "receiving")
SLOW_TRAINER = {
    "name": "tests.plugins:slow_add_epsilon",
    "params": {"sleep_s": 0.4, "epsilon": 0.001},
}
NO_PROGRESS = re.compile(r"no progress for (\S+) s while (\w+)")


def test_proxy_counts_cuts_corrupts_throttles_and_stalls(cluster: Cluster) -> None:
    """The test tool itself, in-process, against the real server's small JSON routes."""
    cluster.start_server()
    with ProxyThread(cluster.port) as px:

        def get(path: str, timeout: float = 5.0) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=timeout)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        assert get("/v1/health") == (200, b'{"status": "ok"}')
        st = px.stats()
        assert (st.connections, st.requests, st.count("^GET /v1/health ")) == (1, 1, 1)
        assert st.bytes_up > 0 and st.bytes_down > len(b'{"status": "ok"}')
        assert st.body("^GET /v1/health ", "down") == len(b'{"status": "ok"}')
        assert st.body("^GET /v1/health ", "up") == 0  # a GET has a head only

        px.set_faults(Rule(match="health", direction="down", corrupt_at_byte=2))
        assert get("/v1/health") == (200, b'{"\x8ctatus": "ok"}')
        assert get("/v1/health") == (200, b'{"status": "ok"}')  # only the first match
        assert px.stats().corruptions == 1

        px.set_faults(Rule(match="health", direction="down", cut_after_bytes=12, limit=1))
        # http.client takes a status line cut short by EOF as a bodiless answer, so the
        # cut shows either as an error or as a reply that lacks the real body
        try:
            cut: tuple[int, bytes] | None = get("/v1/health")
        except (http.client.HTTPException, OSError):
            cut = None
        assert cut != (200, b'{"status": "ok"}')
        assert get("/v1/health")[0] == 200
        assert px.stats().cuts == 1

        px.set_faults(Rule(match="admin/jobs", direction="down", throttle_bps=1000))
        started = time.monotonic()
        status, body = get("/v1/admin/jobs")
        assert status == 200 and body == b"[]"
        assert time.monotonic() - started >= 0.1  # head and body at 1000 bytes/s

        px.set_faults(Rule(direction="down", stall=True))
        with pytest.raises(TimeoutError):
            get("/v1/health", timeout=0.5)
        assert px.stats().stalled >= 1
        px.clear_faults()
        assert get("/v1/health")[0] == 200
        px.reset_stats()
        assert px.stats().requests == 0


def test_slow_transfers_outlast_the_timeouts_without_error(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    # Each request moves one segment at 256 KiB/s: 2.5 s per segment, each way, with
    # communication_timeout 1 s on both sides. The ack wait is longer: the client hands
    # the last bytes of a segment to its kernel socket buffer (hundreds of KiB on
    # loopback) and from then on waits for the acknowledgement while those bytes drain
    # through the throttle.
    timeouts = {**TIMEOUTS, "streaming_ack_wait": 10.0}
    cluster.server_extra["timeouts"] = timeouts
    cluster.start_server()
    proxy.set_faults(Rule(direction="both", throttle_bps=256 * 1024))
    start_site(
        cluster,
        "site-1",
        via=proxy.url,
        timeouts=timeouts,
        transfer={"window": 1, "io_chunk_kib": 64},
    )
    started = time.monotonic()
    job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=1, shape=[400, 400]))
    status = cluster.wait_job(job_id, timeout=60)
    took = time.monotonic() - started
    assert status["job"]["state"] == "finished", cluster.logs()

    size = status["job"]["model_bytes"]
    assert took >= 2 * size / (256 * 1024) >= 4 * TIMEOUT_S
    client_log = log_text(cluster, "site-1")
    assert not re.search(r"WARNING|ERROR|no progress|attempt", client_log), client_log
    assert "no progress" not in log_text(cluster, "server")
    st = proxy.stats()
    assert st.count(GET_MODEL) == 1 and st.count(PUT_SEGMENT) == 1
    assert_exact_model(cluster, job_id, 1, [1])


def test_slow_answers_within_communication_timeout_are_no_error(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    # The server takes 0.7 x communication_timeout to start answering each task, model
    # range, acknowledgement and commit: the remote is slow (preparing), not dead.
    timeouts = {**TIMEOUTS, "communication_timeout": 2.0, "streaming_ack_wait": 2.0}
    slow = 0.7 * timeouts["communication_timeout"]
    cluster.start_server()
    proxy.set_faults(
        *(
            Rule(match=m, direction="down", delay_s=slow)
            for m in (r"^GET /v1/clients/\S+/task", GET_MODEL, PUT_SEGMENT, r"/commit ")
        )
    )
    start_site(cluster, "site-1", via=proxy.url, timeouts=timeouts, transfer={"window": 2})
    job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=2, shape=[512, 512]))
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()
    client_log = log_text(cluster, "site-1")
    assert not re.search(r"WARNING|ERROR|no progress|attempt", client_log), client_log
    fired = {r["rule"]["match"]: r["fired"] for r in proxy.stats().rules}
    assert all(n >= 1 for n in fired.values()), fired
    assert_exact_model(cluster, job_id, 1, [1])


def test_stalled_transfers_fail_fast_naming_the_stage_then_resume(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cluster.server_extra["timeouts"] = TIMEOUTS
    cluster.start_server()
    proxy.set_faults(Rule(match=GET_MODEL, direction="down", stall=True, after_bytes=300_000))
    start_site(
        cluster,
        "site-1",
        via=proxy.url,
        timeouts=TIMEOUTS,
        transfer={"window": 2, "io_chunk_kib": 64},
    )
    job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=2, shape=[512, 512]))

    # the download stalls: the client's receiving timer fires after about 1 s
    cluster.wait_for(lambda: proxy.stats().stalled > 0, 30, "the download to stall")
    stalled_at = time.monotonic()
    m = wait_log(cluster, "site-1", r"download of segment \d+ .*" + NO_PROGRESS.pattern)
    assert time.monotonic() - stalled_at <= TIMEOUT_S + 1.5
    assert float(m.group(1)) == TIMEOUT_S and m.group(2) == "receiving"
    assert cluster.status(job_id)["job"]["state"] == "running"

    # the upload stalls: the server's receiving timer fires after about 1 s as well
    proxy.set_faults(Rule(match=PUT_SEGMENT, direction="up", stall=True, after_bytes=300_000))
    cluster.wait_for(lambda: proxy.stats().stalled > 0, 30, "the upload to stall")
    stalled_at = time.monotonic()
    m = wait_log(cluster, "server", r"segment \d+ of task \S+ .*" + NO_PROGRESS.pattern)
    assert time.monotonic() - stalled_at <= TIMEOUT_S + 1.5
    assert float(m.group(1)) == TIMEOUT_S and m.group(2) in STAGE_WORDS
    m = wait_log(cluster, "site-1", r"segment \d+ of task .*" + NO_PROGRESS.pattern)
    assert m.group(2) in STAGE_WORDS

    proxy.clear_faults()
    status = cluster.wait_job(job_id, timeout=30)
    assert status["job"]["state"] == "finished", cluster.logs()
    assert_exact_model(cluster, job_id, 1, [1])


def test_client_survives_a_stall_longer_than_all_segment_attempts(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cluster.server_extra["timeouts"] = TIMEOUTS
    cluster.start_server()
    proxy.set_faults(Rule(match=GET_MODEL, direction="down", stall=True, after_bytes=300_000))
    start_site(
        cluster,
        "site-1",
        via=proxy.url,
        timeouts=TIMEOUTS,
        transfer={"window": 2, "max_segment_attempts": 2, "io_chunk_kib": 64},
    )
    job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=2, shape=[512, 512]))
    # both tries time out in the receiving stage; the client keeps the task to resume
    wait_log(cluster, "site-1", r"gave up after 2 attempts: .*no progress .* will resume")
    time.sleep(0.5)
    assert cluster.clients["site-1"].alive(), log_text(cluster, "site-1")[-3000:]
    assert "Traceback" not in log_text(cluster, "site-1")
    proxy.clear_faults()
    status = cluster.wait_job(job_id, timeout=30)
    assert status["job"]["state"] == "finished", cluster.logs()
    assert_exact_model(cluster, job_id, 1, [1])


def test_a_fault_that_persists_is_retried_less_and_less_often(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    # the first five model responses are garbled: each pass at the task fails on a digest
    cluster.start_server()
    proxy.set_faults(Rule(match=GET_MODEL, direction="down", corrupt_at_byte=5000, limit=5))
    start_site(
        cluster,
        "site-1",
        via=proxy.url,
        retry_backoff_max_s=2.0,
        transfer={"window": 1, "max_segment_attempts": 1},
    )
    job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=2, shape=[512, 512]))
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    failures = re.findall(
        r"^(\d\d):(\d\d):(\d\d\.\d+) .* task \S+ interrupted: .*digest.*; "
        r"will resume in ([\d.]+) s$",
        log_text(cluster, "site-1"),
        re.MULTILINE,
    )
    assert [float(f[3]) for f in failures] == [0.5, 1.0, 2.0, 2.0, 2.0], failures
    at = [int(h) * 3600 + int(m) * 60 + float(sec) for h, m, sec, _ in failures]
    gaps = [(b - a) % 86400 for a, b in itertools.pairwise(at)]
    # each gap is the pause (within 20 %) and one short pass at the task
    assert gaps[0] >= 0.4 and gaps[1] >= 0.8 and min(gaps[2:]) >= 1.6, gaps
    assert proxy.stats().corruptions == 5
    assert_exact_model(cluster, job_id, 1, [1])


def test_a_disk_that_refuses_writes_is_reported_and_the_task_waits_for_it(
    cluster: Cluster,
) -> None:
    # RLIMIT_FSIZE makes the site's disk refuse files past 256 KiB (EFBIG: Python
    # ignores SIGXFSZ); the model needs ~1.8 MiB, its log far less
    cluster.start_server()
    site = start_site(cluster, "site-1")
    # the soft limit only: raising it again needs no privilege
    _, hard = resource.prlimit(site.popen.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(site.popen.pid, resource.RLIMIT_FSIZE, (256 * 1024, hard))
    job_id = cluster.submit(small_job(rounds=1, clients=1))
    failed = (
        r"this site's disk failed: download \S+model.safetensors.part: cannot create: "
        r"File too large; trying again in ([\d.]+) s \(free space or fix the disk under "
    )
    wait_log(cluster, "site-1", failed)
    wait_log(cluster, "site-1", failed + r"(?s:.*)" + failed)  # tried again, still refused
    assert site.alive() and cluster.status(job_id)["job"]["state"] == "running"
    assert "Traceback" not in log_text(cluster, "site-1")
    resource.prlimit(site.popen.pid, resource.RLIMIT_FSIZE, (hard, hard))
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()
    assert_exact_model(cluster, job_id, 1, [1])


def _start_two_slow_clients(cluster: Cluster, **job: Any) -> str:
    cluster.start_server()
    start_site(cluster, "site-1")
    start_site(cluster, "site-2")
    return cluster.submit(small_job(tensors=4, shape=[256, 256], trainer=SLOW_TRAINER, **job))


def test_dead_client_is_dropped_at_train_timeout_and_the_job_goes_on(cluster: Cluster) -> None:
    train_timeout = 3.0
    job_id = _start_two_slow_clients(cluster, rounds=2, clients=1, train_timeout=train_timeout)
    cluster.wait_for(
        lambda: in_phase(cluster, job_id, "site-2", "training", moved=0), 30, "site-2 training"
    )
    kill(cluster, "site-2")
    killed_at = time.time()
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    round1 = status["rounds"][0]
    assert round1["num_updates"] == 1
    # closed once site-2 had shown no progress for train_timeout (heartbeats every 0.5 s)
    assert train_timeout - 1.0 <= round1["closed_at"] - killed_at <= train_timeout + 2.0
    (dead,) = tasks_of(status, "site-2", 1)
    assert dead["state"] == "expired" and "train_timeout" in dead["reason"]
    assert [t["state"] for t in tasks_of(status, "site-1")] == ["committed", "committed"]
    assert_exact_model(cluster, job_id, 2, [1])


def test_dead_client_fails_the_job_when_min_clients_cannot_be_met(cluster: Cluster) -> None:
    job_id = _start_two_slow_clients(cluster, rounds=1, clients=2, train_timeout=3.0)
    cluster.wait_for(
        lambda: in_phase(cluster, job_id, "site-2", "training", moved=0), 30, "site-2 training"
    )
    kill(cluster, "site-2")
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "failed", cluster.logs()
    reason = status["job"]["reason"]
    assert "site-2" in reason and "train_timeout" in reason, reason
    assert "site-1" not in reason.split("train_timeout")[-1], reason
    (dead,) = tasks_of(status, "site-2", 1)
    assert dead["state"] == "expired"


def test_server_killed_mid_round_resumes_without_redoing_a_round(cluster: Cluster) -> None:
    rounds = 3
    job_id = _start_two_slow_clients(cluster, rounds=rounds, clients=2)

    def round2_running() -> bool:
        st = cluster.status(job_id)
        return (
            len(st["rounds"]) == 2
            and st["rounds"][0]["state"] == "closed"
            and len(tasks_of(st, "site-1", 2) + tasks_of(st, "site-2", 2)) > 0
        )

    cluster.wait_for(round2_running, 30, "round 2 under way")
    before = cluster.status(job_id)
    kill(cluster, "server")
    time.sleep(0.5)
    cluster.start_server()
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    assert [r["round"] for r in status["rounds"]] == [1, 2, 3]
    assert status["rounds"][0] == before["rounds"][0]  # round 1: same closed_at, same updates
    assert [t for t in status["tasks"] if t["round"] == 1] == [
        t for t in before["tasks"] if t["round"] == 1
    ]
    # round 2 went on with the tasks issued before the kill: none was issued twice
    for site in ("site-1", "site-2"):
        assert [t["round"] for t in tasks_of(status, site)] == [1, 2, 3]
    assert re.search(rf"resuming job {job_id} at round 2", log_text(cluster, "server"))
    assert_exact_model(cluster, job_id, rounds, [1, 1])


def test_client_back_after_its_round_closed_gets_task_expired_and_joins_current_round(
    cluster: Cluster,
) -> None:
    job_id = _start_two_slow_clients(cluster, rounds=3, clients=1, train_timeout=2.0)
    cluster.wait_for(
        lambda: in_phase(cluster, job_id, "site-2", "training", moved=0), 30, "site-2 training"
    )
    late = cluster.clients["site-2"].popen.pid
    os.kill(late, signal.SIGSTOP)
    try:
        cluster.wait_for(
            lambda: cluster.status(job_id)["rounds"][0]["state"] == "closed", 30, "round 1 closed"
        )
    finally:
        os.kill(late, signal.SIGCONT)
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()

    (old,) = tasks_of(status, "site-2", 1)
    assert old["state"] == "expired"
    # the client was told, by name of task, and went on to the round then open
    assert re.search(
        rf"task {old['task_id']} \(job {job_id}, round 1\) has expired", log_text(cluster, "site-2")
    )
    later = [t for t in tasks_of(status, "site-2") if t["round"] > 1]
    assert later and all(t["state"] == "committed" for t in later), status["tasks"]
    assert status["rounds"][0]["num_updates"] == 1
    assert_exact_model(cluster, job_id, 3, [1])
