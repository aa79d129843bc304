"""Small JSON requests: bodies that arrive in pieces, bodies too large, and heartbeats
that name a task, as the real server sees them on loopback."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from common.wire import CLIENT_HEADER
from tests.cluster import Cluster, small_job
from tests.rawclient import RawSite

pytestmark = pytest.mark.integration


def _post_in_pieces(
    port: int, path: str, client: str, pieces: list[bytes], pause_s: float
) -> tuple[int, Any]:
    """POST one JSON body (Content-Length of the whole) in ``pieces``, pausing between them."""
    body_len = sum(map(len, pieces))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{CLIENT_HEADER}: {client}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {body_len}\r\n"
        "Connection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(head.encode() + pieces[0])
        for piece in pieces[1:]:
            time.sleep(pause_s)
            s.sendall(piece)
        raw = b""
        while data := s.recv(65536):
            raw += data
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, json.loads(payload) if payload else None


def _client(cluster: Cluster, name: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = [c for c in cluster.get("/v1/admin/clients") if c["name"] == name]
    (row,) = rows
    return row


def test_a_json_body_arriving_in_pieces_is_read_whole(cluster: Cluster) -> None:
    cluster.start_server()
    body = json.dumps({"phase": "downloading", "bytes_done": 5, "bytes_total": 10}).encode()
    status, reply = _post_in_pieces(
        cluster.port, "/v1/clients/site-a/heartbeat", "site-a", [body[:7], body[7:]], 0.3
    )
    assert status == 200, reply
    assert _client(cluster, "site-a")["phase"] == "downloading"


def test_a_json_body_over_the_limit_is_refused_by_size(cluster: Cluster) -> None:
    cluster.start_server()
    pad = " " * (1024 * 1024)
    body = b'{"phase": "idle"' + pad.encode() + b"}"
    status, reply = _post_in_pieces(
        cluster.port, "/v1/clients/site-a/heartbeat", "site-a", [body[:100], body[100:]], 0.1
    )
    assert status == 400, reply
    assert reply["code"] == "bad_request" and "JSON body too large" in reply["message"], reply
    assert "1048576 bytes" in reply["message"], reply


def test_a_heartbeat_naming_another_sites_task_is_refused_and_not_recorded(
    cluster: Cluster,
) -> None:
    cluster.start_server()
    a, b = RawSite(cluster.port, "site-a"), RawSite(cluster.port, "site-b")
    a.hello()
    cluster.submit(small_job(rounds=1, clients=1, tensors=1, shape=[8]))
    theirs = b.task()["task_id"]
    reply = a.json(
        "POST", "/v1/clients/site-a/heartbeat", {"task_id": theirs, "phase": "uploading"}
    )
    assert reply.status == 403 and reply.code == "forbidden", reply
    row = _client(cluster, "site-a")
    assert row["task_id"] is None and row["phase"] == "idle", row
    # a task that does not exist is not recorded either
    reply = a.json("POST", "/v1/clients/site-a/heartbeat", {"task_id": "nope", "phase": "training"})
    assert reply.status == 404, reply
    row = _client(cluster, "site-a")
    assert row["task_id"] is None and row["phase"] == "idle", row
