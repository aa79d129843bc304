"""Mutual TLS with real processes: a provisioned job, refused callers, roles, ownership.

Every server here runs with a project provisioned by ``Cluster(tls=True)``; callers are
the real ``fl-client`` daemons and ``fl-admin`` command, or the standard library's
HTTPS client where a test needs to send what our own tools never would. Each refusal is
checked on both sides: the caller's error and the server's log line.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.http_client import tls_failure
from fl_client.admin.provision import Project, provision
from tests.cluster import (
    ApiError,
    Cluster,
    assert_exact_model,
    fl_admin,
    log_text,
    small_job,
    wait_log,
)

pytestmark = pytest.mark.integration

PEER = r"127\.0\.0\.1:\d+"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One TLS server for the refusal and role checks (they leave no state behind)."""
    c = Cluster(tmp_path_factory.mktemp("tls"), tls=True)
    c.credentials("client", "site-1")
    c.start_server()
    yield c
    c.stop_all()


def admin_config(cluster: Cluster, name: str, tls: dict[str, str] | None) -> Path:
    settings: dict[str, Any] = {"server_url": cluster.url}
    if tls is not None:
        settings["tls"] = tls
    else:
        settings["server_url"] = cluster.url.replace("https://", "http://")
    return cluster.write_yaml(f"{name}.yaml", settings)


def expired_admin(cluster: Cluster) -> dict[str, str]:
    """An admin certificate from the project CA, correct in all but its dates."""
    ca_key = serialization.load_pem_private_key(
        (cluster.pki / "ca" / "ca.key").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((cluster.pki / "ca" / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "test-project"),
            x509.NameAttribute(x509.NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
            x509.NameAttribute(x509.NameOID.COMMON_NAME, "admin"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    d = cluster.root / "expired"
    d.mkdir(exist_ok=True)
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {
        "cert": str(d / "cert.pem"),
        "key": str(d / "key.pem"),
        "ca": cluster.credentials("admin", "admin")["ca"],
    }


def other_project_admin(cluster: Cluster) -> dict[str, str]:
    """An admin of another project (another CA), trusting this project's CA."""
    out = cluster.root / "other-project"
    if not out.exists():
        project = {
            "name": "other-project",
            "server": {"host_name": "127.0.0.1"},
            "admins": [{"name": "admin"}],
        }
        provision(Project.model_validate(project), out, now=datetime.now(UTC))
    own = cluster.credentials("admin", "admin")
    d = out / "admins" / "admin"
    return {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"), "ca": own["ca"]}


# --- the job ----------------------------------------------------------------------------


def test_provisioned_sites_run_a_job_over_mutual_tls_exactly(tls_cluster: Cluster) -> None:
    c = tls_cluster
    c.start_server()
    c.start_client("site-1", num_samples=1)
    c.start_client("site-2", num_samples=3)
    job_id = c.submit(small_job(rounds=2, tensors=3, shape=[700, 600]))
    status = c.wait_job(job_id)
    assert status["job"]["state"] == "finished", c.logs()
    assert_exact_model(c, job_id, 2, [1, 3])
    server_log = log_text(c, "server")
    assert "mutual TLS on: presenting CN=127.0.0.1,OU=server,O=test-project" in server_log
    assert "TLS is off" not in server_log and "refused" not in server_log
    for site in ("site-1", "site-2"):
        assert f"server https://127.0.0.1:{c.port}" in log_text(c, site)
        assert not re.search(r"WARNING|ERROR", log_text(c, site)), log_text(c, site)
    for site in ("site-1", "site-2"):
        assert c.clients[site].stop() == 0
    # the same port speaks nothing but TLS
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=10)
    try:
        conn.request("GET", "/v1/health")
        resp = conn.getresponse()
        assert resp.status == 400 and json.loads(resp.read())["message"].startswith(
            "this server accepts only HTTPS"
        )
    finally:
        conn.close()
    assert c.server is not None
    assert c.server.stop() == 0, c.server.tail()
    assert "fl-server stopped" in log_text(c, "server")


# --- refused callers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "caller_words", "server_words"),
    [
        (
            "another CA",
            "the peer refused our certificate: it was not issued by the peer's project CA",
            "certificate verify failed: unable to get local issuer certificate "
            "(not issued by this project's CA)",
        ),
        (
            "expired",
            "the peer refused our certificate: it has expired",
            "certificate verify failed: certificate has expired",
        ),
        (
            "server certificate",
            "the peer refused our certificate: it is not for this use (wrong role?)",
            "certificate verify failed: unsuitable certificate purpose",
        ),
        (
            "plain HTTP",
            "this server accepts only HTTPS with a client certificate of its project",
            "plain HTTP was sent to the TLS port",
        ),
    ],
)
def test_fl_admin_refused_with_reasons_on_both_sides(
    server: Cluster, case: str, caller_words: str, server_words: str
) -> None:
    credentials: dict[str, Callable[[], dict[str, str] | None]] = {
        "another CA": lambda: other_project_admin(server),
        "expired": lambda: expired_admin(server),
        "server certificate": lambda: server.credentials("server", "server"),
        "plain HTTP": lambda: None,
    }
    tls = credentials[case]()
    config = admin_config(server, case.replace(" ", "-"), tls)
    mark = len(log_text(server, "server"))
    run = fl_admin("--config", str(config), "clients")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    prefix = "" if case == "plain HTTP" else f"TLS handshake with {server.url} failed: "
    assert run.stderr.strip().startswith(f"fl-admin: {prefix}{caller_words}"), run.stderr
    wait_log(
        server,
        "server",
        rf"TLS handshake with {PEER} refused: {re.escape(server_words)}",
        after=mark,
    )


def test_caller_without_a_certificate_is_refused(server: Cluster) -> None:
    ctx = ssl.create_default_context(cafile=server.credentials("admin", "admin")["ca"])
    mark = len(log_text(server, "server"))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
    with pytest.raises(ssl.SSLError) as err:
        try:
            conn.request("GET", "/v1/health")
            conn.getresponse()
        finally:
            conn.close()
    assert err.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    caller = tls_failure(err.value, server.url)
    assert caller is not None
    assert str(caller) == (
        f"TLS handshake with {server.url} failed: the server requires a client certificate "
        "and none was sent"
    )
    wait_log(
        server,
        "server",
        rf"TLS handshake with {PEER} refused: the peer presented no certificate",
        after=mark,
    )


def test_site_daemon_with_an_expired_certificate_says_so(server: Cluster) -> None:
    tls = expired_admin(server)  # right CA, expired; the role does not matter: it never gets in
    mark = len(log_text(server, "server"))
    server.start_client("site-9", tls=tls, retry_backoff_max_s=1.0)
    try:
        server.wait_for(
            lambda: (
                f"TLS handshake with {server.url} failed: the peer refused our certificate: "
                "it has expired" in log_text(server, "site-9")
            ),
            30,
            "the daemon to report the refusal",
        )
        assert "cannot reach the server" in log_text(server, "site-9")
        assert server.clients["site-9"].alive()  # it keeps trying, it does not crash
        wait_log(
            server,
            "server",
            r"refused: certificate verify failed: certificate has expired",
            after=mark,
        )
    finally:
        server.clients.pop("site-9").stop()


# --- roles ------------------------------------------------------------------------------


def test_roles_client_certificates_cannot_administer_and_admins_cannot_act_as_sites(
    server: Cluster,
) -> None:
    mark = len(log_text(server, "server"))
    with pytest.raises(ApiError) as err:
        server.request("GET", "/v1/admin/jobs", as_client="site-1")
    assert err.value.status == 403
    assert err.value.body == {
        "code": "forbidden",
        "message": "GET /v1/admin/jobs needs an admin certificate; this connection presented "
        "the client certificate of 'site-1'",
        "field": None,
    }
    with pytest.raises(ApiError) as err:
        server.request("GET", "/v1/clients/admin/task?wait=0")
    assert err.value.status == 403
    assert err.value.body["message"] == (
        "GET /v1/clients/admin/task needs a client site's certificate; this connection "
        "presented the admin certificate of 'admin'"
    )
    wait_log(
        server,
        "server",
        r"GET /v1/admin/jobs -> forbidden: .*client certificate of 'site-1'",
        after=mark,
    )
    wait_log(
        server,
        "server",
        r"GET /v1/clients/admin/task -> forbidden: .*admin certificate",
        after=mark,
    )
    # both get through the handshake: the health check answers either
    assert server.request("GET", "/v1/health", as_client="site-1") == {"status": "ok"}
    assert server.request("GET", "/v1/health") == {"status": "ok"}
    # and fl-admin holding a site's certificate gets the server's words
    config = admin_config(server, "site-as-admin", server.credentials("client", "site-1"))
    run = fl_admin("--config", str(config), "list")
    assert run.returncode == 1
    assert run.stderr.strip() == (
        "fl-admin: GET /v1/admin/jobs needs an admin certificate; this connection presented "
        "the client certificate of 'site-1'"
    )


# --- ownership --------------------------------------------------------------------------


def _status(c: Cluster, method: str, path: str, client: str, **kw: Any) -> tuple[int, Any]:
    try:
        return 200, c.request(method, path, as_client=client, **kw)
    except ApiError as exc:
        return exc.status, exc.body


def _raw(
    c: Cluster, method: str, path: str, client: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", c.port, context=c.ssl_context(client), timeout=30
    )
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_a_site_cannot_touch_another_sites_task_and_the_job_is_unharmed(
    tls_cluster: Cluster,
) -> None:
    c = tls_cluster
    c.start_server()
    job_id = c.submit(small_job(rounds=1, tensors=2, shape=[512, 512]))
    # both sites are known (the job waits for min_clients); site-2 takes its task
    c.request("POST", "/v1/clients/site-1/heartbeat", {}, as_client="site-1")
    reply = c.request("GET", "/v1/clients/site-2/task?wait=10", as_client="site-2")
    task = reply["task"]["task_id"]
    mark = len(log_text(c, "server"))
    attempts: dict[str, tuple[str, str, dict[str, Any]]] = {
        "site-2's tasks": ("GET", "/v1/clients/site-2/task?wait=0", {}),
        "site-2's model": ("GET", f"/v1/tasks/{task}/model", {}),
        "site-2's upload status": ("GET", f"/v1/tasks/{task}/upload", {}),
        "site-2's commit": (
            "POST",
            f"/v1/tasks/{task}/commit",
            {"body": {"digest": "x", "num_samples": 1}},
        ),
        "site-2's heartbeat": ("POST", "/v1/clients/site-2/heartbeat", {"body": {}}),
        "site-2's failure": ("POST", f"/v1/tasks/{task}/fail", {"body": {"reason": "no"}}),
    }
    for what, (method, path, kw) in attempts.items():
        status, body = _status(c, method, path, "site-1", **kw)
        assert status == 403, (what, status, body)
        assert body["code"] == "forbidden" and "site-1" in body["message"], (what, body)
    status, body = _raw(
        c, "PUT", f"/v1/tasks/{task}/upload/0", "site-1", b"\0" * 1024, {"X-FL-Digest": "0"}
    )
    assert (status, body["code"]) == (403, "forbidden")
    assert body["message"] == f"task {task} belongs to another client, not to 'site-1'"
    # a header claiming to be site-2 does not help: the certificate decides
    status, body = _status(
        c, "GET", "/v1/clients/site-2/task?wait=0", "site-1", headers={"X-FL-Client": "site-2"}
    )
    assert status == 403
    assert (
        body["message"]
        == "the X-FL-Client header names 'site-2' but this connection's certificate is 'site-1''s"
    )
    wait_log(
        c,
        "server",
        rf"GET /v1/tasks/{task}/model -> forbidden: task {task} belongs to another client",
        after=mark,
    )
    wait_log(c, "server", rf"PUT /v1/tasks/{task}/upload/0 -> forbidden", after=mark)

    c.start_client("site-1")
    c.start_client("site-2")
    final = c.wait_job(job_id)
    assert final["job"]["state"] == "finished", c.logs()
    (t2,) = [t for t in final["tasks"] if t["client"] == "site-2"]
    assert (t2["task_id"], t2["state"]) == (task, "committed")  # the same task, unharmed
    assert_exact_model(c, job_id, 1, [1, 1])
