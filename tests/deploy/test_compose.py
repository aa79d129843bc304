"""deploy/docker-compose.yml and its Dockerfile, checked without a Docker engine.

What can go wrong without anyone noticing until ``docker compose up``: a service or
volume missing, a command that is not one of the project's console scripts, a daemon
started before its certificate exists, a ``--config`` path the startup kits do not have
or that does not validate, sites dialling a name the server's certificate does not
carry, kits that the daemons' user cannot read.

The kits are made as the ``provision`` service makes them: its command, parsed by
``fl-provision``'s own parser, is run with the real console script on the compose
project file, into a temporary directory that stands for the kits volume.
"""

from __future__ import annotations

import re
import shlex
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509
from pydantic import BaseModel

from common.config import AdminConfig, ClientConfig, JobConfig, ServerConfig
from common.config_load import load_config
from common.identity import Role, identity_from_peercert
from common.tls import client_context, server_context
from fl_client.admin.provision.cli import build_parser
from tests.deploy.units import DEPLOY, console_scripts, provision

COMPOSE = DEPLOY / "docker-compose.yml"
PROVISION, SERVER, ADMIN = "provision", "server", "admin"
SITES = ("site-1", "site-2")
SERVICES = {PROVISION, SERVER, *SITES, ADMIN}
WORKSPACE = "/var/lib/fl"
SCHEMAS: dict[str, type[BaseModel]] = {
    "fl-server": ServerConfig,
    "fl-client": ClientConfig,
    "fl-admin": AdminConfig,
}
SCRIPT_WORD = re.compile(r"(?<![\w/.-])fl-[a-z]+\b")


@dataclass(frozen=True)
class Kits:
    volume: str  # the named volume the provision service writes
    target: str  # where it is mounted in every container (fl-provision's -o)
    host: Path  # what fl-provision wrote here, standing for the volume


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def kits(compose: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Kits:
    """Run the provision service's fl-provision command here."""
    svc = compose["services"][PROVISION]
    argv = svc["command"]
    assert isinstance(argv, list) and argv[0] == "fl-provision", argv
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"fl-provision does not accept {argv[1:]}")
    assert args.output is not None, "provision must name its output (-o): the kits volume"
    target = str(args.output)
    volumes = [source for source, tgt, _ in mounts_of(svc) if tgt == target]
    assert volumes, f"provision writes {target}, which is not a mount of the service"
    assert volumes[0] in compose["volumes"], f"{target} must be a named volume"
    host = provision(resolve(svc, str(args.project)), tmp_path_factory.mktemp("kits"))
    return Kits(volumes[0], target, host)


def mounts_of(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of every short-syntax volume entry."""
    out = []
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def resolve(service: dict[str, Any], container_path: str, kits: Kits | None = None) -> Path:
    """Where a path in the service's container is here: in a bind mount's source in the
    repository, or in the provisioned kits if the service mounts the kits volume."""
    mounts: dict[str, Path] = {}
    for source, target, _ in mounts_of(service):
        if source.startswith((".", "/")):
            mounts[target] = (DEPLOY / source).resolve()
        elif kits is not None and source == kits.volume:
            mounts[target] = kits.host
    for target in sorted(mounts, key=len, reverse=True):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return mounts[target] / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not in any mount of the service")


def words_of(argv: str | list[str]) -> list[str]:
    """A command's words; for ``sh -c SCRIPT`` the script's words, $( and ) split off."""
    argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
    if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"]):
        script = argv[2].replace("$$(", " ").replace(")", " ")
        return shlex.split(script)
    return argv


def commands(service: dict[str, Any]) -> list[list[str]]:
    """The service's command and, if it has one, its healthcheck command."""
    out = [words_of(service["command"])]
    health = service.get("healthcheck")
    if health is not None:
        test = health["test"]
        assert test[0] == "CMD", "healthcheck: exec form, no shell"
        out.append(list(test[1:]))
    return out


def test_services_and_volumes(compose: dict[str, Any], kits: Kits) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    declared = set(compose["volumes"])
    for name, svc in services.items():
        for source, _, mode in mounts_of(svc):
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind source {source} missing"
                assert mode == "ro", f"{name}: the repository is mounted read-only"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    workspaces = {}
    for name in (SERVER, *SITES):
        [volume] = [s for s, t, _ in mounts_of(services[name]) if t == WORKSPACE]
        assert volume != kits.volume
        workspaces[name] = volume
    assert len(set(workspaces.values())) == len(workspaces), "a workspace volume each"
    # only provision writes the kits; everyone else reads them
    for name, svc in services.items():
        modes = [m for s, t, m in mounts_of(svc) if s == kits.volume and t == kits.target]
        assert modes == (["rw"] if name == PROVISION else ["ro"]), f"{name}: kits mount {modes}"


def test_start_order_and_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prov = services[PROVISION]
    assert "depends_on" not in prov and prov["restart"] == "no"
    # its exit (0) must not stop the project under `up --exit-code-from admin`
    assert prov.get("attach") is False, "provision: attach: false"
    for name in SERVICES - {PROVISION}:
        after = services[name]["depends_on"]
        assert after[PROVISION]["condition"] == "service_completed_successfully", name
    for name in (*SITES, ADMIN):
        assert services[name]["depends_on"][SERVER]["condition"] == "service_healthy"
    for site in SITES:
        assert services[ADMIN]["depends_on"][site]["condition"] == "service_started"
    assert services[ADMIN]["restart"] == "no"
    health = services[SERVER]["healthcheck"]["test"]
    assert health[0] == "CMD" and health[1] == "fl-admin" and "--config" in health


def test_every_command_is_a_console_script(compose: dict[str, Any]) -> None:
    scripts = console_scripts()
    for name, svc in compose["services"].items():
        cmd = svc["command"]
        text = cmd if isinstance(cmd, str) else shlex.join(cmd)
        named = SCRIPT_WORD.findall(text)
        assert named, f"{name} runs none of the project's commands"
        for word in named:
            assert word in scripts, f"{name}: {word} is not in [project.scripts]"
        argv = shlex.split(cmd) if isinstance(cmd, str) else cmd
        programs = [c[0] for c in commands(svc)[1:]]  # the healthcheck's
        if argv[0] not in ("sh", "/bin/sh"):
            programs.append(argv[0])
        for program in programs:
            assert program in scripts, f"{name}: {program} is not in [project.scripts]"


def test_configs_come_from_the_kits_and_validate(compose: dict[str, Any], kits: Kits) -> None:
    loaded: dict[str, list[BaseModel]] = {}
    for name, svc in compose["services"].items():
        if name == PROVISION:
            continue
        for words in commands(svc):
            for i, word in enumerate(words):
                if word == "--config":
                    program = next(w for w in reversed(words[:i]) if w in SCHEMAS)
                    assert words[i + 1].startswith(kits.target + "/"), f"{name}: not a kit"
                    path = resolve(svc, words[i + 1], kits)
                    assert path.is_file(), f"{name}: fl-provision made no {words[i + 1]}"
                    cfg = load_config(path, SCHEMAS[program])
                    tls = getattr(cfg, "tls", None)
                    assert tls is not None, f"{name}: {words[i + 1]} has no tls: section"
                    for part in (tls.cert, tls.key, tls.ca):
                        assert part.is_file() and part.parent == path.parent, part
                    assert tls.key.stat().st_mode & 0o077 == 0, f"{tls.key}: not 0600"
                    loaded.setdefault(name, []).append(cfg)
                if word == "submit":
                    job = load_config(resolve(svc, words[i + 1]), JobConfig)
                    assert job.min_clients <= len(SITES)
        assert name in loaded, f"{name}: starts with no configuration from the kits"

    [server, admin_check] = loaded[SERVER]
    assert isinstance(server, ServerConfig) and isinstance(admin_check, AdminConfig)
    assert server.host == "0.0.0.0" and server.tls is not None
    assert str(server.workspace) == WORKSPACE
    published = [p.rsplit(":", 1)[-1] for p in compose["services"][SERVER]["ports"]]
    assert published == [str(server.port)]
    expected_url = f"https://{SERVER}:{server.port}"
    for site in SITES:
        [client] = loaded[site]
        assert isinstance(client, ClientConfig)
        assert client.name == site and client.server_url == expected_url
        assert str(client.workspace) == WORKSPACE
    for admin in [*loaded[ADMIN], admin_check]:
        assert isinstance(admin, AdminConfig) and admin.server_url == expected_url


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> dict[str, Any]:
    """A TLS handshake through memory buffers; the certificate the server was shown."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=host)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    pending = [c, s]
    for _ in range(10):
        for end in list(pending):
            try:
                end.do_handshake()
                pending.remove(end)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            break
    assert not pending, "the handshake did not complete"
    peer = s.getpeercert()
    assert isinstance(peer, dict)
    return peer


def test_kits_talk_mutual_tls_under_the_names_dialled(compose: dict[str, Any], kits: Kits) -> None:
    """Each site and the admin, with its kit, against the server's kit: the server
    certificate is valid for the host in their server_url and for the address the
    port is published on, and the server reads the caller's identity from its kit."""
    server = load_config(kits.host / "server" / "server.yaml", ServerConfig)
    assert server.tls is not None
    server_ctx: ssl.SSLContext = server_context(server.tls)
    published = {p.split(":")[0] for p in compose["services"][SERVER]["ports"]}
    callers: list[tuple[str, Role, ClientConfig | AdminConfig]] = [
        (site, Role.CLIENT, load_config(kits.host / "clients" / site / "client.yaml", ClientConfig))
        for site in SITES
    ]
    for admin_dir in sorted((kits.host / "admins").iterdir()):
        callers.append(
            (admin_dir.name, Role.ADMIN, load_config(admin_dir / "admin.yaml", AdminConfig))
        )
    for name, role, cfg in callers:
        assert cfg.tls is not None
        host = urlsplit(cfg.server_url).hostname
        assert host is not None
        for dialled in (host, *published):
            peer = handshake(server_ctx, client_context(cfg.tls), dialled)
            ident = identity_from_peercert(peer)
            assert (ident.name, ident.role) == (name, role), dialled

    cert = x509.load_pem_x509_certificate(server.tls.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert SERVER in san.get_values_for_type(x509.DNSName)


def test_dockerfile_builds_from_what_the_repository_has(
    compose: dict[str, Any], kits: Kits
) -> None:
    for name, svc in compose["services"].items():
        build = svc["build"]
        context = (DEPLOY / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        # every service runs as the image's user: the one provision writes the kits as
        assert "user" not in svc, f"{name}: a user of its own could not read the kits' keys"
    lines = [line.split() for line in dockerfile.read_text().splitlines() if line.strip()]
    for words in lines:
        if words[0] == "COPY":
            for source in words[1:-1]:
                assert (context / source).exists(), f"COPY {source}: not in the repository"
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0"), "the daemons must not run as root"
    # a new volume takes the owner of its mount point in the image: the kits and the
    # workspaces must be the daemons' user's, or provision cannot write them
    text = dockerfile.read_text().replace("\\\n", " ")
    owned = [
        path
        for m in re.finditer(rf"chown {re.escape(users[-1])}:\S+ ([^&\n]+)", text)
        for path in m.group(1).split()
    ]
    for path in (kits.target, WORKSPACE):
        assert path in owned, f"{path} is not chowned to {users[-1]} in the Dockerfile"
    ignored = (context / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
