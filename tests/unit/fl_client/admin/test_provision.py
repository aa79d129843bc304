"""fl-provision: project file validation, certificate contents, written configs, re-runs."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import AdminConfig, ClientConfig, ServerConfig
from common.config_load import load_config
from common.errors import ConfigError
from fl_client.admin.provision import Project, provision
from fl_client.admin.provision.certs import load_key
from fl_client.admin.provision.cli import main
from tests.cluster import REPO

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
PROJECT: dict[str, Any] = {
    "name": "proj",
    "server": {
        "host_name": "fl.example.org",
        "port": 9443,
        "extra_dns_names": ["fl-internal.example.org"],
        "ip_addresses": ["203.0.113.10", "::1"],
    },
    "clients": [{"name": "site-1", "num_samples": 3}, {"name": "site-2"}],
    "admins": [{"name": "alice@example.org"}],
    "validity": {"ca_days": 100, "cert_days": 10},
}


def _project(**changes: Any) -> Project:
    data = {**PROJECT, **changes}
    return Project.model_validate(data)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _subject(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    provision(_project(), tmp_path / "out", now=NOW)
    return tmp_path / "out"


# --- the project file -------------------------------------------------------------------


def _write_project(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "project.yaml"
    path.write_text(textwrap.dedent(text))
    return path


BASE = """\
name: proj
server:
  host_name: fl.example.org
clients:
  - name: site-1
"""


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ("colour: blue\n", "colour", "unknown key"),
        ("admins:\n  - name: site-1\n", "admins", "names used by both a site and an admin"),
        ("admins:\n  - name: bob\n  - name: bob\n", "admins", "listed more than once: ['bob']"),
        ("validity:\n  cert_days: 0\n", "validity.cert_days", "greater than 0"),
        ("validity:\n  ca_dayz: 3\n", "validity.ca_dayz", "unknown key"),
    ],
)
def test_project_file_errors_name_file_field_and_problem(
    tmp_path: Path, extra: str, field: str, words: str
) -> None:
    path = _write_project(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_config(path, Project)
    text = str(err.value)
    assert text.startswith(f"{path}: invalid configuration:")
    assert f"  {field}:" in text and words in text, text


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (BASE.replace("fl.example.org", "fl_bad!host"), "server.host_name", "neither a DNS"),
        (BASE.replace("site-1", "site 1"), "clients.0.name", "should match pattern"),
        (BASE + "  - name: site-1\n", "clients", "listed more than once: ['site-1']"),
        ("name: proj\nclients: []\n", "server", "required but missing"),
    ],
)
def test_project_file_errors_in_sections(tmp_path: Path, text: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write_project(tmp_path, text), Project)
    assert f"  {field}:" in str(err.value) and words in str(err.value), str(err.value)


def test_cli_prints_one_line_and_exit_2_for_a_bad_file(tmp_path: Path) -> None:
    path = _write_project(tmp_path, BASE + "colour: blue\n")
    run = subprocess.run(
        [sys.executable, "-m", "fl_client.admin.provision.cli", str(path), "-o", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith(f"fl-provision: {path}: invalid configuration:")
    assert "colour: unknown key" in run.stderr
    assert not (tmp_path / "ca").exists()


# --- what is written --------------------------------------------------------------------


def test_ca_certificate(out: Path) -> None:
    ca = _cert(out / "ca" / "ca.pem")
    assert ca.subject == ca.issuer
    assert _subject(ca, NameOID.COMMON_NAME) == ["proj CA"]
    assert _subject(ca, NameOID.ORGANIZATION_NAME) == ["proj"]
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca.verify_directly_issued_by(ca)
    assert ca.not_valid_after_utc == NOW + timedelta(days=100)
    assert stat.S_IMODE((out / "ca" / "ca.key").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("folder", "cn", "role", "usage"),
    [
        ("server", "fl.example.org", "server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("clients/site-1", "site-1", "client", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("clients/site-2", "site-2", "client", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("admins/alice@example.org", "alice@example.org", "admin", ExtendedKeyUsageOID.CLIENT_AUTH),
    ],
)
def test_participant_certificates(
    out: Path, folder: str, cn: str, role: str, usage: x509.ObjectIdentifier
) -> None:
    d = out / folder
    cert = _cert(d / "cert.pem")
    ca = _cert(out / "ca" / "ca.pem")
    cert.verify_directly_issued_by(ca)  # signed by the project CA
    assert (d / "ca.pem").read_bytes() == (out / "ca" / "ca.pem").read_bytes()
    assert _subject(cert, NameOID.COMMON_NAME) == [cn]
    assert _subject(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == [role]
    assert _subject(cert, NameOID.ORGANIZATION_NAME) == ["proj"]
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == (
        x509.ExtendedKeyUsage([usage])
    )
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=10)
    key = load_key((d / "key.pem").read_bytes())
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert stat.S_IMODE((d / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_server_certificate_names_every_address_clients_dial(out: Path) -> None:
    cert = _cert(out / "server" / "cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "fl-internal.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("203.0.113.10"),
        ipaddress.ip_address("::1"),
    ]
    site = _cert(out / "clients" / "site-1" / "cert.pem")
    with pytest.raises(x509.ExtensionNotFound):
        site.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_an_ip_host_name_becomes_an_ip_san(tmp_path: Path) -> None:
    provision(_project(server={"host_name": "127.0.0.1", "port": 1234}), tmp_path / "o", now=NOW)
    cert = _cert(tmp_path / "o" / "server" / "cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    cfg = load_config(tmp_path / "o" / "admins" / "alice@example.org" / "admin.yaml", AdminConfig)
    assert cfg.server_url == "https://127.0.0.1:1234"


def test_written_configs_validate_and_point_at_the_folder(out: Path) -> None:
    server = load_config(out / "server" / "server.yaml", ServerConfig)
    assert (server.host, server.port, server.url) == ("0.0.0.0", 9443, "https://0.0.0.0:9443")
    assert server.tls is not None and server.tls.cert == out / "server" / "cert.pem"
    assert server.tls.key.is_file() and server.tls.ca.is_file()
    site = load_config(out / "clients" / "site-1" / "client.yaml", ClientConfig)
    assert (site.name, site.num_samples) == ("site-1", 3)
    assert site.server_url == "https://fl.example.org:9443"
    assert site.tls is not None and site.tls.key == out / "clients" / "site-1" / "key.pem"
    admin = load_config(out / "admins" / "alice@example.org" / "admin.yaml", AdminConfig)
    assert admin.tls is not None and admin.tls.cert.read_bytes().startswith(b"-----BEGIN")
    # the tls: paths are relative in the file, so the folder can move to its machine
    text = yaml.safe_load((out / "clients" / "site-1" / "client.yaml").read_text())
    assert text["tls"] == {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem"}


# --- re-runs ----------------------------------------------------------------------------


def test_rerun_keeps_everything_and_adds_new_participants(out: Path) -> None:
    before = _snapshot(out)
    (out / "clients" / "site-1" / "client.yaml").write_text(
        (out / "clients" / "site-1" / "client.yaml").read_text() + "log_level: DEBUG\n"
    )
    edited = (out / "clients" / "site-1" / "client.yaml").read_bytes()
    bigger = _project(
        clients=[*PROJECT["clients"], {"name": "site-3"}],
        admins=[*PROJECT["admins"], {"name": "bob"}],
    )
    outcomes = provision(bigger, out, now=NOW + timedelta(days=1))
    after = _snapshot(out)
    for name, data in before.items():
        if name != "clients/site-1/client.yaml":
            assert after[name] == data, f"{name} changed"
    assert after["clients/site-1/client.yaml"] == edited  # an admin's edit survives
    assert {(o.name, o.action) for o in outcomes} == {
        ("proj CA", "kept"),
        ("fl.example.org", "kept"),
        ("site-1", "kept"),
        ("site-2", "kept"),
        ("alice@example.org", "kept"),
        ("site-3", "created"),
        ("bob", "created"),
    }
    ca = _cert(out / "ca" / "ca.pem")
    _cert(out / "clients" / "site-3" / "cert.pem").verify_directly_issued_by(ca)
    _cert(out / "admins" / "bob" / "cert.pem").verify_directly_issued_by(ca)


def test_rerun_completes_a_key_left_without_its_certificate(out: Path) -> None:
    key = (out / "clients" / "site-2" / "key.pem").read_bytes()
    (out / "clients" / "site-2" / "cert.pem").unlink()
    outcomes = provision(_project(), out, now=NOW)
    assert [o.action for o in outcomes if o.name == "site-2"] == ["completed"]
    assert (out / "clients" / "site-2" / "key.pem").read_bytes() == key
    cert = _cert(out / "clients" / "site-2" / "cert.pem")
    assert cert.public_key() == load_key(key).public_key()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            {"server": {**PROJECT["server"], "extra_dns_names": ["other.example.org"]}},
            "it names [fl.example.org, fl-internal.example.org, 203.0.113.10, ::1], the "
            "project file [fl.example.org, other.example.org, 203.0.113.10, ::1]",
        ),
        ({"name": "other"}, "is the CA of project ['proj'], the project file names 'other'"),
    ],
)
def test_rerun_refuses_what_it_cannot_keep_and_changes_nothing(
    out: Path, change: dict[str, Any], words: str
) -> None:
    before = _snapshot(out)
    with pytest.raises(ConfigError) as err:
        provision(_project(**change), out, now=NOW)
    assert words in str(err.value), str(err.value)
    assert _snapshot(out) == before


def test_rerun_refuses_an_expired_certificate(out: Path) -> None:
    with pytest.raises(ConfigError) as err:
        provision(_project(), out, now=NOW + timedelta(days=11))
    assert "server/cert.pem cannot be kept: it expired on 2030-01-11" in str(err.value)
    assert "Remove" in str(err.value)


def test_rerun_refuses_a_certificate_from_another_ca(out: Path, tmp_path: Path) -> None:
    provision(_project(), tmp_path / "other", now=NOW)
    for name in ("cert.pem", "key.pem"):
        src = tmp_path / "other" / "clients" / "site-1" / name
        (out / "clients" / "site-1" / name).write_bytes(src.read_bytes())
    with pytest.raises(ConfigError) as err:
        provision(_project(), out, now=NOW)
    assert "it was not issued by this project's CA" in str(err.value)


def test_cli_writes_the_project_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_project(tmp_path, BASE + "admins:\n  - name: alice\n")
    assert main([str(path), "-o", str(tmp_path / "p")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[:4]] == [
        ["ca", "proj", "CA"],
        ["server", "fl.example.org", "created"],
        ["client", "site-1", "created"],
        ["admin", "alice", "created"],
    ]
    assert "ca.key offline" in lines[-1]
    assert main([str(path), "-o", str(tmp_path / "p")]) == 0
    assert all(" kept " in line for line in capsys.readouterr().out.splitlines()[:4])


def test_configs_example_project_file_is_valid() -> None:
    project = load_config(REPO / "configs" / "project.yaml", Project)
    assert [c.name for c in project.clients] == ["site-1", "site-2"]
