"""Prometheus metrics scraped from the real server and a client's metrics port after a job."""

from __future__ import annotations

import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster, free_port, small_job

pytestmark = pytest.mark.integration

ROUNDS = 3


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the page, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_server_and_client_metrics_after_a_job(cluster: Cluster) -> None:
    metrics_port = free_port()
    cluster.start_server()
    cluster.start_client("site-1", metrics_port=metrics_port)
    cluster.start_client("site-2")
    # 4 tensors of 301 x 257 float32 over 1 MiB segments: 2 segments per model
    job_id = cluster.submit(small_job(rounds=ROUNDS, tensors=4))
    status = cluster.wait_job(job_id)
    assert status["job"]["state"] == "finished", cluster.logs()
    file_size = status["job"]["model_bytes"]
    segments = math.ceil(file_size / (cluster.segment_mib * 1024 * 1024))
    assert segments == 2

    s = scrape(cluster.url + "/metrics")
    # every update byte the two sites uploaded, and every model byte they fetched
    assert value(s, "fl_server_received_bytes_total", what="update") == 2 * ROUNDS * file_size
    assert value(s, "fl_server_sent_bytes_total", what="model") == 2 * ROUNDS * file_size
    assert value(s, "fl_server_sent_bytes_total", what="result") == 0
    up = value(s, "fl_server_segment_throughput_bytes_per_second_count", direction="upload")
    down = value(s, "fl_server_segment_throughput_bytes_per_second_count", direction="download")
    assert up == down == 2 * ROUNDS * segments
    assert value(s, "fl_server_segment_throughput_bytes_per_second_sum", direction="upload") > 0
    assert not [k for k in s if k[0] == "fl_server_segments_refused_total"]
    # state read from the database
    assert value(s, "fl_server_rounds_completed_total") == ROUNDS
    assert value(s, "fl_server_round_duration_seconds_count") == ROUNDS
    assert value(s, "fl_server_round_duration_seconds_bucket", le="+Inf") == ROUNDS
    assert value(s, "fl_server_round_duration_seconds_sum") > 0
    assert value(s, "fl_server_jobs", state="finished") == 1
    for state in ("pending", "running", "failed", "aborted"):
        assert value(s, "fl_server_jobs", state=state) == 0
    assert value(s, "fl_server_clients_alive") == 2
    assert value(s, "fl_server_active_tasks", phase="uploading") == 0
    # requests by route: one commit per site and round
    commit = "/v1/tasks/{task_id}/commit"
    assert value(s, "fl_server_requests_total", method="POST", route=commit, status="200") == 6
    # the process collector
    assert value(s, "process_resident_memory_bytes") > 10 * 1024 * 1024
    assert value(s, "process_open_fds") > 0

    # a result download is counted as such
    cluster.download(job_id, ROUNDS, cluster.root / "final.st")
    # counted when the handler ends, which may be a moment after the last byte arrived
    cluster.wait_for(
        lambda: (
            value(scrape(cluster.url + "/metrics"), "fl_server_sent_bytes_total", what="result")
            == file_size
        ),
        10,
        "the result download counted",
    )

    c = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    assert value(c, "fl_client_received_bytes_total", what="model") == ROUNDS * file_size
    assert value(c, "fl_client_sent_bytes_total", what="update") == ROUNDS * file_size
    assert value(c, "fl_client_updates_committed_total") == ROUNDS
    for direction in ("download", "upload"):
        n = value(c, "fl_client_segment_throughput_bytes_per_second_count", direction=direction)
        assert n == ROUNDS * segments
        assert value(c, "fl_client_segments_retried_total", direction=direction) == 0
    assert value(c, "fl_client_phase", phase="idle") == 1
    assert value(c, "fl_client_phase", phase="uploading") == 0
    assert value(c, "process_resident_memory_bytes") > 10 * 1024 * 1024
    assert value(c, "process_open_fds") > 0


def test_client_refuses_to_start_on_a_taken_metrics_port(cluster: Cluster) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cluster.start_client("site-1", metrics_port=port)
        proc.popen.wait(30)
    assert proc.popen.returncode == 1
    assert f"metrics_port: cannot listen on 127.0.0.1:{port}" in proc.tail()
