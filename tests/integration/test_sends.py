"""Model downloads that hold their sending threads do not hold up anything else."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from common.wire import CLIENT_HEADER
from tests.cluster import Cluster, small_job
from tests.rawclient import RawSite

pytestmark = pytest.mark.integration
STALLED = 8  # two sites with transfer.window 4: more than the loop's default threads


def _stalled_download(port: int, client: str, model_url: str) -> socket.socket:
    """Ask for the whole model and read nothing: the server's send blocks in poll()."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(
        f"GET {model_url} HTTP/1.1\r\nHost: 127.0.0.1\r\n{CLIENT_HEADER}: {client}\r\n"
        "Range: bytes=0-\r\n\r\n".encode()
    )
    return s


def _answered_quickly(port: int, method: str, path: str, body: object = None) -> int:
    """The status of one request, which must be answered within a few seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={CLIENT_HEADER: "site-a"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_stalled_downloads_leave_requests_and_the_job_loop_alone(cluster: Cluster) -> None:
    cluster.start_server()
    a = RawSite(cluster.port, "site-a")
    a.hello()
    # 64 MiB: far more than the socket buffers of a peer that reads nothing
    job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=16, shape=[1024, 1024]))
    task = a.task(wait_s=60)
    socks = [_stalled_download(cluster.port, "site-a", task["model_url"]) for _ in range(STALLED)]
    try:
        time.sleep(1.0)  # every send has filled its socket and waits for the peer
        # requests that go to the database and the disk are answered at once
        port = cluster.port
        assert _answered_quickly(port, "POST", "/v1/clients/site-a/heartbeat", {}) == 200
        assert _answered_quickly(port, "GET", f"/v1/admin/jobs/{job_id}") == 200
        assert _answered_quickly(port, "GET", f"/v1/tasks/{task['task_id']}/upload") == 200
    finally:
        for s in socks:
            s.close()
    assert cluster.server is not None and cluster.server.alive()
