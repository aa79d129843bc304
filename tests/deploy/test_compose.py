"""deploy/docker-compose.yml and its Dockerfile, checked without a Docker engine.

What can go wrong without anyone noticing until ``docker compose up``: a service or
volume missing, a command that is not one of the project's console scripts, a mounted
file that does not exist or does not validate, sites that point at the wrong server.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from common.config import AdminConfig, ClientConfig, JobConfig, ServerConfig, load_config
from tests.deploy.units import DEPLOY, console_scripts

COMPOSE = DEPLOY / "docker-compose.yml"
SERVICES = {"server", "site-1", "site-2", "admin"}
SITES = ("site-1", "site-2")
SCHEMAS: dict[str, type[BaseModel]] = {
    "fl-server": ServerConfig,
    "fl-client": ClientConfig,
    "fl-admin": AdminConfig,
}
SCRIPT_WORD = re.compile(r"(?<![\w/.-])fl-[a-z]+\b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def command_text(service: dict[str, Any]) -> str:
    cmd = service["command"]
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def shell_words(service: dict[str, Any]) -> list[str]:
    """The command's words; for ``sh -c SCRIPT`` the script's words, $( and ) split off."""
    cmd = service["command"]
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"]):
        script = argv[2].replace("$$(", " ").replace(")", " ")
        return shlex.split(script)
    return argv


def binds(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (host paths are relative)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = (DEPLOY / source).resolve()
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path:
    mounts = binds(service)
    for target in sorted(mounts, key=len, reverse=True):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return mounts[target] / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not in any bind mount of the service")


def test_services_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    declared = set(compose["volumes"])
    for name, svc in services.items():
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    for name in ("server", *SITES):
        targets = [v.split(":")[1] for v in services[name]["volumes"]]
        assert "/var/lib/fl" in targets, f"{name} needs its workspace volume"
        assert "/etc/fl" in targets, f"{name} reads its configuration from /etc/fl"


def test_start_order_and_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    health = services["server"]["healthcheck"]
    assert health["test"][0] == "CMD" and health["test"][1] in console_scripts()
    assert "http://127.0.0.1:8470" in health["test"]
    for name in (*SITES, "admin"):
        assert services[name]["depends_on"]["server"]["condition"] == "service_healthy"
    for site in SITES:
        assert services["admin"]["depends_on"][site]["condition"] == "service_started"
    assert services["admin"]["restart"] == "no"


def test_every_command_is_a_console_script(compose: dict[str, Any]) -> None:
    scripts = console_scripts()
    for name, svc in compose["services"].items():
        named = SCRIPT_WORD.findall(command_text(svc))
        assert named, f"{name} runs none of the project's commands"
        for word in named:
            assert word in scripts, f"{name}: {word} is not in [project.scripts]"
        argv = shell_words(svc)
        if svc["command"][0] not in ("sh", "/bin/sh"):
            assert argv[0] in scripts


def test_mounted_configs_exist_and_validate(compose: dict[str, Any]) -> None:
    loaded: dict[str, BaseModel] = {}
    for name, svc in compose["services"].items():
        words = shell_words(svc)
        checked = 0
        for i, word in enumerate(words):
            if word == "--config":
                program = next(w for w in reversed(words[:i]) if w in SCHEMAS)
                path = host_path(svc, words[i + 1])
                assert path.is_file(), f"{name}: {words[i + 1]} -> {path} missing"
                loaded[name] = load_config(path, SCHEMAS[program])
                checked += 1
            if word == "submit":
                path = host_path(svc, words[i + 1])
                job = load_config(path, JobConfig)
                assert job.min_clients <= len(SITES)
                checked += 1
        assert checked, f"{name}: no configuration file checked"

    server = loaded["server"]
    assert isinstance(server, ServerConfig)
    assert server.host == "0.0.0.0" and str(server.workspace) == "/var/lib/fl"
    expected_url = f"http://server:{server.port}"
    for site in SITES:
        client = loaded[site]
        assert isinstance(client, ClientConfig)
        assert client.name == site and client.server_url == expected_url
        assert str(client.workspace) == "/var/lib/fl"
    admin = loaded["admin"]
    assert isinstance(admin, AdminConfig) and admin.server_url == expected_url


def test_dockerfile_builds_from_what_the_repository_has(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        build = svc["build"]
        context = (DEPLOY / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
    lines = [line.split() for line in dockerfile.read_text().splitlines() if line.strip()]
    for words in lines:
        if words[0] == "COPY":
            for source in words[1:-1]:
                assert (context / source).exists(), f"COPY {source}: not in the repository"
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0"), "the daemons must not run as root"
    ignored = (context / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
