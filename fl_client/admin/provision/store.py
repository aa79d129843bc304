"""Writing the provisioned project to disk, keeping whatever is already there.

Re-running ``fl-provision`` on the same output directory adds new participants and
changes nothing that exists: the CA, every certificate and key, and every config file
(an admin may have edited one) are kept. An existing certificate is checked before it
is kept (issued by this CA, for this holder, with the names the project file lists,
matching its key, not expired); one that fails is reported, never silently replaced,
since replacing it would lock its site out until the new folder arrives.

Files appear atomically (written beside, then renamed); keys are created with mode
0600 and folders with 0700. A key is written before its certificate, so an interrupted
run leaves at most a key without a certificate, which the next run completes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import yaml
from cryptography import x509

from common.config_load import parse_config
from common.errors import ConfigError, FLError
from fl_client.admin.provision import certs
from fl_client.admin.provision.layout import (
    CA_CERT,
    CA_DIR,
    CA_KEY,
    CERT,
    KEY,
    Participant,
    participants,
)
from fl_client.admin.provision.project import Project

KEY_MODE = 0o600
FILE_MODE = 0o644
DIR_MODE = 0o700

Action = Literal["created", "kept", "completed"]


@dataclass(frozen=True)
class Outcome:
    role: str
    name: str
    folder: Path
    action: Action


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FLError(f"{path}: cannot read: {exc.strerror}") from None


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return certs.load_cert(_read(path))
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM certificate ({exc})") from None


def _load_key(path: Path) -> certs.PrivateKey:
    try:
        return certs.load_key(_read(path))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM EC private key ({exc})") from None


def _mkdir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def _ca(
    project: Project, out: Path, now: datetime
) -> tuple[certs.PrivateKey, x509.Certificate, Action]:
    folder = out / CA_DIR
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert != have_key:
        present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise ConfigError(
            f"{present} exists but {missing} does not; restore it from a backup, or use a "
            "new output directory for a new CA (every certificate must then be replaced)"
        )
    if have_cert:
        key, cert = _load_key(key_path), _load_cert(cert_path)
        orgs = certs.projects_of(cert)
        if orgs != [project.name]:
            raise ConfigError(
                f"{cert_path} is the CA of project {orgs}, the project file names "
                f"{project.name!r}; keep the name or use another output directory",
                field="name",
            )
        if cert.not_valid_after_utc <= now:
            raise ConfigError(
                f"{cert_path}: the project CA expired on {cert.not_valid_after_utc:%Y-%m-%d}"
            )
        return key, cert, "kept"
    _mkdir(folder)
    key = certs.new_key()
    cert = certs.build_ca(project.name, key, now=now, days=project.validity.ca_days)
    _write(key_path, certs.key_pem(key), KEY_MODE)
    _write(cert_path, certs.cert_pem(cert), FILE_MODE)
    return key, cert, "created"


def _participant(
    p: Participant,
    out: Path,
    project: Project,
    ca_key: certs.PrivateKey,
    ca_cert: x509.Certificate,
    now: datetime,
) -> Action:
    folder = out / p.folder
    cert_path, key_path = folder / CERT, folder / KEY
    config_path = folder / p.config_name
    # Validate the config with the project's own schema before anything is written.
    parse_config(p.config, p.schema, source=str(config_path), config_dir=folder)
    _mkdir(folder)
    action: Action
    if cert_path.exists():
        if not key_path.exists():
            raise ConfigError(
                f"{cert_path} exists without its key {key_path}; remove {folder} to issue "
                "new credentials for it"
            )
        key = _load_key(key_path)
        problems = certs.problems_with(_load_cert(cert_path), key, ca_cert, p.holder, now=now)
        if problems:
            raise ConfigError(
                f"{cert_path} cannot be kept: {'; '.join(problems)}. Remove {folder} and "
                "run again to issue new credentials, then give the new folder to its owner"
            )
        action = "kept"
    else:
        if key_path.exists():
            key, action = _load_key(key_path), "completed"
        else:
            key, action = certs.new_key(), "created"
            _write(key_path, certs.key_pem(key), KEY_MODE)
        cert = certs.issue_for(
            ca_cert,
            ca_key,
            p.holder,
            key.public_key(),
            project=project.name,
            now=now,
            days=project.validity.cert_days,
        )
        _write(cert_path, certs.cert_pem(cert), FILE_MODE)
    ca_pem = certs.cert_pem(ca_cert)
    if not (folder / CA_CERT).exists() or _read(folder / CA_CERT) != ca_pem:
        _write(folder / CA_CERT, ca_pem, FILE_MODE)
    if not config_path.exists():
        head = (
            f"# {p.config_name} for {p.holder.role} {p.holder.name!r} of project "
            f"{project.name!r}, written by fl-provision.\n"
            "# Paths under tls: are relative to this file; see docs/configuration.md.\n"
        )
        text = head + yaml.safe_dump(p.config, sort_keys=False)
        _write(config_path, text.encode(), FILE_MODE)
    return action


def provision(project: Project, out: Path, *, now: datetime) -> list[Outcome]:
    """Create or complete the project under ``out``; one outcome per CA and participant."""
    try:
        _mkdir(out)
        ca_key, ca_cert, ca_action = _ca(project, out, now)
        outcomes = [Outcome("ca", f"{project.name} CA", out / CA_DIR, ca_action)]
        for p in participants(project):
            action = _participant(p, out, project, ca_key, ca_cert, now)
            outcomes.append(Outcome(p.holder.role.value, p.holder.name, out / p.folder, action))
    except OSError as exc:
        raise FLError(f"{exc.filename or out}: cannot write: {exc.strerror}") from None
    return outcomes
