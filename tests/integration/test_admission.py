"""Connection admission with real processes: floods that never authenticate, deadlines, idle.

A flood of connections from 127.0.0.1, the sites' own address, that never complete a
TLS handshake or a request head used to fill ``limits.max_connections`` and lock every
site and admin out with 503 for as long as it lasted. Here a thousand of them (and a
hundred more each second) run against a server with a limit of 64 while a site runs a
job to the end and an admin polls it: no call may see 503, every flood connection must
be closed by the server (evicted for a newcomer, or at its deadline), ``/metrics`` must
count them by reason, and the log must stay short.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import FAST_SITE, ApiError, Cluster, log_text, small_job, wait_log
from tests.flood import ENDLESS_HEAD, Flood, Kind, client_hello

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 64
HEAD_S = 3.0
HANDSHAKE_S = 2.0
SLACK_S = 8.0  # a loaded 2-core machine: timers fire late, processes get scheduled late
CLOSE_LINES = r"closed connection from|more connections closed|answered 503"


def closed_counts(c: Cluster) -> dict[str, float]:
    """``fl_server_connections_closed_total`` by reason, from the server's /metrics."""
    with urllib.request.urlopen(c.url + "/metrics", timeout=60, context=c.ssl_context()) as resp:
        text = resp.read().decode()
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "fl_server_connections_closed_total"
    }


class AdminPoller:
    """An admin listing jobs and reading one job's status over and over, in a thread,
    counting what each call got: ``ok``, an HTTP status, or ``conn_error``."""

    def __init__(self, c: Cluster, job_id: str) -> None:
        self.c = c
        self.job_id = job_id
        self.outcomes: Counter[str] = Counter()
        self.state = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _call(self, path: str) -> Any:
        try:
            result = self.c.get(path)
        except ApiError as exc:
            self.outcomes[str(exc.status)] += 1
            return None
        except OSError:  # urllib.error.URLError included
            self.outcomes["conn_error"] += 1
            return None
        self.outcomes["ok"] += 1
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            self._call("/v1/admin/jobs")
            status = self._call(f"/v1/admin/jobs/{self.job_id}")
            if status is not None:
                self.state = status["job"]["state"]
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def flood_kinds(c: Cluster) -> list[Kind]:
    """Plain: silent, and request headers that never end. TLS: silent (no handshake), a
    ClientHello a byte at a time, and one in ten that completes the handshake with a
    site's certificate and then trickles its headers."""
    if not c.tls:
        return [Kind("silent"), Kind("slow head", ENDLESS_HEAD)]
    site = c.ssl_context("site-1")
    assert site is not None
    slow_hello = Kind("slow hello", client_hello())
    mix = [Kind("silent"), slow_hello] * 4 + [Kind("silent"), Kind("slow head", ENDLESS_HEAD, site)]
    return mix


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_flood_from_the_sites_address_locks_out_no_site_or_admin(
    tls: bool, request: pytest.FixtureRequest
) -> None:
    c: Cluster = request.getfixturevalue("tls_cluster" if tls else "cluster")
    c.server_extra["limits"] = {
        "max_connections": MAX_CONNECTIONS,
        "request_head_timeout_s": HEAD_S,
        "tls_handshake_timeout_s": HANDSHAKE_S,
    }
    if tls:
        c.credentials("client", "site-1")  # provisioned before the server starts
    c.start_server()
    began = time.monotonic()
    flood = Flood(c.port, flood_kinds(c), burst=1000, per_s=300).start()
    # the whole burst is in before the site starts: the server is full of the flood
    c.wait_for(lambda: flood.opened + flood.failed >= 1000, 60, "the flood's first thousand")
    job_began = time.monotonic()
    c.start_client("site-1", **FAST_SITE)
    job_id = c.submit(small_job(rounds=4, clients=1, tensors=8, shape=[512, 1024]))
    admin = AdminPoller(c, job_id)
    try:
        c.wait_for(lambda: admin.state in ("finished", "failed", "aborted"), 180, "the job")
    finally:
        admin.stop()
        job_s = time.monotonic() - job_began
        flood.stop(timeout=HEAD_S + SLACK_S)
    print(
        f"flood ({'tls' if tls else 'plain'}): {flood.opened} opened, {flood.failed} ended "
        f"while connecting, longest lived {max(flood.lifetimes):.1f} s; job done in "
        f"{job_s:.1f} s; admin calls {dict(admin.outcomes)}"
    )
    assert admin.state == "finished", c.logs()
    assert c.status(job_id)["job"]["state"] == "finished"
    # nobody authenticated was refused for lack of room
    assert admin.outcomes["503"] == 0 and admin.outcomes["ok"] >= 3, admin.outcomes
    assert "server_busy" not in log_text(c, "site-1")
    assert flood.opened >= 1000, (flood.opened, flood.failed)
    # every flood connection was closed by the server, none later than its deadline
    assert flood.still_open == 0
    assert max(flood.lifetimes) < HEAD_S + SLACK_S

    closed = closed_counts(c)
    assert closed["busy"] == 0
    timeouts = closed["head_timeout"] + closed["handshake_timeout"]
    assert timeouts > 0, closed
    # each flood connection the server took was evicted or timed out
    assert closed["evicted"] + timeouts >= flood.opened, closed
    if tls:
        assert closed["handshake_timeout"] > 0 and closed["head_timeout"] > 0, closed
    # a flood must not flood the log: at most a few lines per reason and 10 s window
    server_log = log_text(c, "server")
    lines = re.findall(CLOSE_LINES, server_log)
    windows = (time.monotonic() - began) / 10 + 2
    assert 0 < len(lines) <= windows * 3 * 4, len(lines)
    wait_log(c, "server", "more connections closed", timeout=30)


def _eof_after(sock: socket.socket | ssl.SSLSocket, limit_s: float) -> float:
    """Seconds until the server closes ``sock`` (read returns nothing or resets)."""
    began = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    return time.monotonic() - began


def _trickle(sock: socket.socket | ssl.SSLSocket, payload: bytes, stop: threading.Event) -> None:
    for i in range(len(payload)):
        if stop.wait(0.5):
            return
        try:
            sock.send(payload[i : i + 1])
        except OSError:
            return


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_connections_without_a_request_head_are_cut_at_their_deadline(
    tls: bool, request: pytest.FixtureRequest
) -> None:
    c: Cluster = request.getfixturevalue("tls_cluster" if tls else "cluster")
    c.server_extra["limits"] = {"request_head_timeout_s": HEAD_S, "tls_handshake_timeout_s": 1.0}
    if tls:
        c.credentials("client", "site-1")  # provisioned before the server starts
    c.start_server()

    # sends nothing: on the TLS port that is a handshake never started
    silent = socket.create_connection(("127.0.0.1", c.port))
    took = _eof_after(silent, HEAD_S + SLACK_S)
    silent.close()
    first = 1.0 if tls else HEAD_S
    assert first - 0.2 <= took < first + SLACK_S, took

    # headers a byte every half second (with TLS after a handshake with a site's certificate)
    raw = socket.create_connection(("127.0.0.1", c.port))
    site = c.ssl_context("site-1")
    slow = site.wrap_socket(raw, server_hostname="127.0.0.1") if site else raw
    stop = threading.Event()
    trickler = threading.Thread(target=_trickle, args=(slow, ENDLESS_HEAD, stop))
    trickler.start()
    try:
        took = _eof_after(slow, HEAD_S + SLACK_S)
    finally:
        stop.set()
        trickler.join()
        slow.close()
    assert HEAD_S - 1.5 <= took < HEAD_S + SLACK_S, took  # the handshake took a little

    closed = closed_counts(c)
    assert closed["head_timeout"] == (1 if tls else 2), closed
    assert closed["handshake_timeout"] == (1 if tls else 0), closed
    server_log = log_text(c, "server")
    assert re.search(r"closed connection from 127\.0\.0\.1:\d+: no whole request head", server_log)
    if tls:
        assert re.search(r"closed connection from \S+: TLS handshake not done", server_log)
        assert "refused" not in server_log  # a timeout is not a refusal


def test_an_idle_keepalive_connection_is_closed_but_a_long_poll_is_not(cluster: Cluster) -> None:
    c = cluster
    idle_s = 2.0
    c.server_extra["limits"] = {"idle_timeout_s": idle_s, "request_head_timeout_s": 1.0}
    c.server_extra["long_poll_s"] = 30
    c.start_server()
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=60)
    # a long-poll far longer than both bounds, on a connection that then stays open
    began = time.monotonic()
    conn.request("GET", "/v1/clients/site-1/task?wait=5", headers={"X-FL-Client": "site-1"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["task"] is None
    assert time.monotonic() - began >= 4.5
    assert conn.sock is not None
    took = _eof_after(conn.sock, idle_s + SLACK_S)
    conn.close()
    assert idle_s - 0.2 <= took < idle_s + SLACK_S, took

    closed = closed_counts(c)
    assert closed["idle"] == 1 and closed["head_timeout"] == 0, closed
    assert not re.search(CLOSE_LINES, log_text(c, "server"))  # idle closes are routine
