"""The pure parts of security: identities, roles, limits, TLS settings and error words.

TLS handshakes here run in memory (``ssl.MemoryBIO``, no sockets) between contexts
built from provisioned files, so the certificates' meaning is checked by OpenSSL itself.
"""

from __future__ import annotations

import ssl
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common.config import AdminConfig, ClientConfig, ServerConfig, TlsFiles
from common.config_load import load_config, parse_config
from common.errors import (
    ConfigError,
    FLError,
    Forbidden,
    RequestError,
    ServerBusy,
    TlsError,
    TooManyRequests,
    TransferError,
    from_wire,
)
from common.http_client import tls_failure
from common.identity import Identity, Role, identity_from_peercert
from common.tls import client_context, describe_handshake_failure, server_context
from fl_client.admin.provision import Project, provision
from fl_client.admin.provision.certs import Holder, issue, load_cert, load_key, new_key
from fl_server.auth import authorize, required_role
from fl_server.handshake import plain_http_refusal
from fl_server.limits import Slots

NOW = datetime.now(UTC)


# --- identity and roles -----------------------------------------------------------------


def _peercert(*rdns: tuple[str, str]) -> dict[str, object]:
    return {"subject": tuple(((k, v),) for k, v in rdns)}


def test_identity_from_a_provisioned_subject() -> None:
    cert = _peercert(
        ("organizationName", "p"), ("organizationalUnitName", "client"), ("commonName", "site-1")
    )
    assert identity_from_peercert(cert) == Identity("site-1", Role.CLIENT)
    assert str(identity_from_peercert(cert)) == "client 'site-1'"


@pytest.mark.parametrize(
    ("cert", "words"),
    [
        (None, "no client certificate"),
        ({}, "no client certificate"),
        (_peercert(("organizationalUnitName", "client")), "one holder in its CN"),
        (_peercert(("commonName", "x")), "must carry one role"),
        (_peercert(("commonName", "x"), ("organizationalUnitName", "root")), "not ['root']"),
        (
            _peercert(
                ("commonName", "a"), ("commonName", "b"), ("organizationalUnitName", "admin")
            ),
            "one holder in its CN, not ['a', 'b']",
        ),
    ],
)
def test_identity_refuses_what_the_ca_never_issues(cert: object, words: str) -> None:
    with pytest.raises(Forbidden) as err:
        identity_from_peercert(cert)
    assert words in str(err.value)


def test_routes_and_roles() -> None:
    assert required_role("/v1/health") is None
    assert required_role("/v1/admin/jobs") is Role.ADMIN
    assert required_role("/v1/admin/jobs/x/model") is Role.ADMIN
    assert required_role("/v1/clients/site-1/task") is Role.CLIENT
    assert required_role("/v1/tasks/t/upload/0") is Role.CLIENT
    site, admin = Identity("site-1", Role.CLIENT), Identity("alice", Role.ADMIN)
    authorize(site, "GET", "/v1/clients/site-1/task", None)
    authorize(site, "GET", "/v1/clients/site-1/task", "site-1")
    authorize(admin, "POST", "/v1/admin/jobs", None)
    authorize(admin, "GET", "/v1/health", None)
    with pytest.raises(
        Forbidden, match=r"needs an admin certificate; .* client certificate of 'site-1'"
    ):
        authorize(site, "GET", "/v1/admin/jobs", None)
    with pytest.raises(
        Forbidden, match=r"needs a client site's certificate; .* admin certificate of 'alice'"
    ):
        authorize(admin, "GET", "/v1/tasks/t/model", None)
    with pytest.raises(
        Forbidden, match=r"header names 'site-2' but this connection's certificate is 'site-1''s"
    ):
        authorize(site, "GET", "/v1/clients/site-1/task", "site-2")
    with pytest.raises(Forbidden):
        authorize(Identity("fl.example.org", Role.SERVER), "GET", "/v1/clients/x/task", None)


# --- limits -----------------------------------------------------------------------------


def test_slots_per_caller_and_total() -> None:
    slots = Slots("long-polls", per_caller=2, per_caller_setting="pc", total=3, total_setting="t")
    slots.acquire("a")
    slots.acquire("a")
    with pytest.raises(TooManyRequests, match=r"a already has 2 long-polls open; limits.pc is 2"):
        slots.acquire("a")
    slots.acquire("b")
    with pytest.raises(
        ServerBusy, match=r"3 long-polls open from all sites, its limit \(limits.t\)"
    ):
        slots.acquire("c")
    slots.release("a")
    with slots.hold("c"):
        assert slots.statistics().by_caller == {"a": 1, "b": 1, "c": 1}
    assert slots.statistics().held == 2
    assert slots.statistics().refused == 2


def test_new_errors_on_the_wire() -> None:
    assert (TooManyRequests.code, TooManyRequests.http_status) == ("too_many_requests", 429)
    assert issubclass(TooManyRequests, RequestError)
    assert (ServerBusy.code, ServerBusy.http_status) == ("server_busy", 503)
    assert issubclass(TlsError, TransferError)
    back = from_wire(ServerBusy("busy", field="x").to_wire(), status=503)
    assert type(back) is ServerBusy and back.field == "x"


def test_plain_http_refusal_is_a_complete_http_response() -> None:
    raw = plain_http_refusal()
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 400 Bad Request"
    assert f"Content-Length: {len(body)}" in lines and "Connection: close" in lines
    err = from_wire(__import__("json").loads(body), status=400)
    assert type(err) is RequestError and "use an https:// server_url" in err.message


# --- TLS settings -----------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_tls_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / "conf.yaml"
    path.write_text("server_url: https://h:1\ntls: {cert: c.pem, key: /abs/k.pem, ca: ../ca.pem}\n")
    cfg = load_config(path, AdminConfig)
    assert cfg.tls == TlsFiles(
        cert=tmp_path / "d" / "c.pem", key=Path("/abs/k.pem"), ca=tmp_path / "d" / "../ca.pem"
    )
    # given as data (not a file), paths stay as they are
    data = {"server_url": "https://h:1", "tls": {"cert": "c", "key": "k", "ca": "a"}}
    assert parse_config(data, AdminConfig, source="x").tls == TlsFiles(
        cert=Path("c"), key=Path("k"), ca=Path("a")
    )


@pytest.mark.parametrize(
    ("model", "text", "words"),
    [
        (
            ClientConfig,
            "name: s\nworkspace: w\nserver_url: https://h:1\n",
            "is https:// but there is no tls: section",
        ),
        (
            AdminConfig,
            "server_url: http://h:1\ntls: {cert: a, key: b, ca: c}\n",
            "plain http:// but a tls: section",
        ),
        (ServerConfig, "workspace: w\nhost: 0.0.0.0\n", "host '0.0.0.0' is not a loopback address"),
        (ServerConfig, "workspace: w\nhost: fl.example.org\n", "set allow_insecure: true"),
        (ServerConfig, "workspace: w\ntls: {cert: a}\n", "tls.key: required but missing"),
        (
            ServerConfig,
            "workspace: w\nlimits: {max_connections: 0}\n",
            "limits.max_connections: Input should be greater than 0",
        ),
    ],
)
def test_tls_setting_errors(tmp_path: Path, model: type, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), model)
    assert words in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("workspace: w\n", "http://127.0.0.1:8470"),
        ("workspace: w\nhost: localhost\n", "http://localhost:8470"),
        ("workspace: w\nhost: '::1'\n", "http://::1:8470"),
        ("workspace: w\nhost: 0.0.0.0\nallow_insecure: true\n", "http://0.0.0.0:8470"),
        ("workspace: w\nhost: 0.0.0.0\ntls: {cert: a, key: b, ca: c}\n", "https://0.0.0.0:8470"),
    ],
)
def test_server_modes_that_are_allowed(tmp_path: Path, text: str, url: str) -> None:
    cfg = load_config(_write(tmp_path, text), ServerConfig)
    assert cfg.url == url
    assert cfg.limits.max_connections == 1024 and cfg.limits.max_long_polls_per_client == 2


def test_unusable_tls_files_name_the_setting(tmp_path: Path) -> None:
    files = TlsFiles(cert=tmp_path / "no.pem", key=tmp_path / "no.key", ca=tmp_path / "no-ca.pem")
    with pytest.raises(ConfigError, match=r"tls.ca: cannot load the CA certificate"):
        server_context(files)


# --- real handshakes in memory ----------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    project = Project.model_validate(
        {
            "name": "p",
            "server": {"host_name": "127.0.0.1", "bind": "127.0.0.1"},
            "clients": [{"name": "site-1"}],
            "admins": [{"name": "alice"}],
        }
    )
    provision(project, out, now=NOW)
    # an expired certificate for site-1 from the same CA, and one from another CA
    ca_cert = load_cert((out / "ca" / "ca.pem").read_bytes())
    ca_key = load_key((out / "ca" / "ca.key").read_bytes())
    from fl_client.admin.provision.certs import cert_pem, key_pem

    key = new_key()
    old = issue(
        ca_cert,
        ca_key,
        Holder("site-1", Role.CLIENT),
        key.public_key(),
        project="p",
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(days=1),
    )
    (out / "expired").mkdir()
    (out / "expired" / "cert.pem").write_bytes(cert_pem(old))
    (out / "expired" / "key.pem").write_bytes(key_pem(key))
    provision(project.model_copy(update={"name": "q"}), out / "other", now=NOW)
    return out


def _files(pki: Path, folder: str, ca: str = "ca/ca.pem") -> TlsFiles:
    return TlsFiles(cert=pki / folder / "cert.pem", key=pki / folder / "key.pem", ca=pki / ca)


def _handshake(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[ssl.SSLObject, dict[str, ssl.SSLError]]:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    errors: dict[str, ssl.SSLError] = {}
    done: set[str] = set()
    for _ in range(8):
        for name, obj, out, peer in (("client", c, c_out, s_in), ("server", s, s_out, c_in)):
            if name not in errors:
                try:
                    if name in done:
                        obj.read(1)  # TLS 1.3: the server's verdict arrives after ours
                    else:
                        obj.do_handshake()
                        done.add(name)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except ssl.SSLError as exc:
                    errors[name] = exc
            if data := out.read():
                peer.write(data)
    return s, errors


def test_handshake_with_a_provisioned_site_gives_its_identity(pki: Path) -> None:
    server, errors = _handshake(
        server_context(_files(pki, "server")), client_context(_files(pki, "clients/site-1"))
    )
    assert errors == {}
    assert identity_from_peercert(server.getpeercert()) == Identity("site-1", Role.CLIENT)
    server, errors = _handshake(
        server_context(_files(pki, "server")), client_context(_files(pki, "admins/alice"))
    )
    assert identity_from_peercert(server.getpeercert()) == Identity("alice", Role.ADMIN)


@pytest.mark.parametrize(
    ("client_folder", "client_ca", "side", "words"),
    [
        ("expired", "ca/ca.pem", "server", "certificate verify failed: certificate has expired"),
        ("other/clients/site-1", "ca/ca.pem", "server", "not issued by this project's CA"),
        (
            "server",
            "ca/ca.pem",
            "server",
            "unsuitable certificate purpose (a certificate for the other end",
        ),
        ("clients/site-1", "other/ca/ca.pem", "client", "not issued by this project's CA"),
    ],
)
def test_refused_handshakes_say_why(
    pki: Path, client_folder: str, client_ca: str, side: str, words: str
) -> None:
    _, errors = _handshake(
        server_context(_files(pki, "server")),
        client_context(_files(pki, client_folder, client_ca)),
    )
    assert side in errors, errors
    assert words in describe_handshake_failure(errors[side])
    if side == "server":  # and the alert the client received says it in the client's words
        assert "client" in errors and tls_failure(errors["client"], "https://h:1") is not None


def test_a_server_certificate_from_a_client_is_not_a_server(pki: Path) -> None:
    # a site's certificate (clientAuth only) presented as the server's is refused
    _, errors = _handshake(
        server_context(_files(pki, "clients/site-1")), client_context(_files(pki, "admins/alice"))
    )
    assert "unsuitable certificate purpose" in describe_handshake_failure(errors["client"])


def test_tls_failure_words_for_the_caller() -> None:
    err = ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired")
    err.reason = "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    wrapped = OSError("read failed")
    wrapped.__cause__ = err
    out = tls_failure(wrapped, "https://h:1")
    assert isinstance(out, TlsError) and isinstance(out, FLError)
    assert (
        str(out)
        == "TLS handshake with https://h:1 failed: the peer refused our certificate: it has expired"
    )
    eof = ssl.SSLError(1, "unexpected eof")
    eof.reason = "UNEXPECTED_EOF_WHILE_READING"
    assert tls_failure(eof, "https://h:1") is None  # a broken connection, not a refusal
    assert tls_failure(ConnectionResetError(), "https://h:1") is None


def test_start_up_line_says_whether_tls_is_on_and_warns_before_expiry(pki: Path) -> None:
    import logging

    from fl_server.handshake import describe_security

    def server(tls: TlsFiles | None) -> ServerConfig:
        return ServerConfig(workspace=Path("w"), tls=tls)

    level, text = describe_security(server(None))
    assert level == logging.WARNING and text.startswith("TLS is off: plain HTTP")
    level, text = describe_security(server(_files(pki, "server")))
    assert level == logging.INFO
    assert text.startswith("mutual TLS on: presenting CN=127.0.0.1,OU=server,O=p (valid until")
    expired = TlsFiles(
        cert=pki / "expired" / "cert.pem", key=pki / "expired" / "key.pem", ca=pki / "ca" / "ca.pem"
    )
    level, text = describe_security(server(expired))
    assert level == logging.WARNING and "The server's certificate has EXPIRED" in text
