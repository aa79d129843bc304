"""The systemd units: what they must say, that they fit the startup kits ``fl-provision``
makes from the example project file, and ``systemd-analyze verify`` where it exists."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
from pydantic import BaseModel

from common.config import ClientConfig, ServerConfig
from common.config_load import load_config
from fl_client.admin.provision import Project
from tests.cluster import REPO
from tests.deploy.units import DEPLOY, console_scripts, parse_unit, provision

UNITS = DEPLOY / "systemd"
INSTALLED_BIN = "/opt/fl-stream/venv/bin/"
SERVER = UNITS / "fl-server.service"
CLIENT = UNITS / "fl-client@.service"
PROJECT = REPO / "configs" / "project.yaml"
CONFIG_ROOT = PurePosixPath("/etc/fl")
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",  # AF_UNIX: NOTIFY_SOCKET
}


def seconds(value: str) -> float:
    units = {"s": 1, "min": 60, "h": 3600}
    for suffix, factor in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].isdigit():
            return float(value[: -len(suffix)]) * factor
    return float(value)


@pytest.mark.parametrize(
    ("path", "script", "config_model"),
    [(SERVER, "fl-server", ServerConfig), (CLIENT, "fl-client", ClientConfig)],
)
def test_unit_contents(path: Path, script: str, config_model: type[BaseModel]) -> None:
    unit = parse_unit(path)
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["Restart"] == "on-failure"
    assert svc["User"] == "fl" and svc["Group"] == "fl"
    for key, value in HARDENING.items():
        assert svc[key] == value, key
    assert svc["MemoryMax"] and int(svc["LimitNOFILE"]) >= 65536
    assert seconds(svc["WatchdogSec"]) >= 10
    # SIGTERM drains for shutdown_timeout_s; systemd must wait longer than that
    drain_s = config_model.model_fields["shutdown_timeout_s"].default
    assert seconds(svc["TimeoutStopSec"]) > drain_s
    # the workspace is the one writable path, and it is the service's state directory
    assert svc["ReadWritePaths"] == "/var/lib/" + svc["StateDirectory"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == INSTALLED_BIN + script
    assert script in console_scripts()
    assert argv[argv.index("--config") + 1].startswith("/etc/fl/")
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def service_section(path: Path, instance: str | None = None) -> dict[str, str]:
    """The [Service] settings, with ``%i`` replaced by ``instance`` for a template."""
    svc = {k: v[-1] for k, v in parse_unit(path)["Service"].items()}
    if instance is not None:
        svc = {k: v.replace("%i", instance) for k, v in svc.items()}
    return svc


def config_path(svc: dict[str, str]) -> PurePosixPath:
    argv = shlex.split(svc["ExecStart"])
    return PurePosixPath(argv[argv.index("--config") + 1])


def test_client_unit_is_a_template_per_site() -> None:
    svc = service_section(CLIENT)
    assert config_path(svc) == CONFIG_ROOT / "%i" / "client.yaml"
    assert svc["WorkingDirectory"] == "/var/lib/fl/%i"
    assert svc["StateDirectory"] == "fl/%i"


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provision(PROJECT, tmp_path_factory.mktemp("kits"))


def test_units_fit_the_kits_of_the_example_project(kits: Path, tmp_path: Path) -> None:
    """Install every kit of ``fl-provision configs/project.yaml`` as deploy/README.md
    says (the kit's folder as the folder of the unit's --config, under a temporary
    root that stands for /), then load the config from there: its TLS files resolve
    beside it, and its workspace is the path the unit may write."""
    project = load_config(PROJECT, Project)
    cases: list[tuple[Path, str | None, Path, type[BaseModel]]] = [
        (SERVER, None, kits / "server", ServerConfig),
        *((CLIENT, c.name, kits / "clients" / c.name, ClientConfig) for c in project.clients),
    ]
    folders = set()
    for unit, instance, kit, schema in cases:
        svc = service_section(unit, instance)
        config = config_path(svc)
        # a folder of its own under /etc/fl, holding the kit's own config file
        assert config.parent.parent == CONFIG_ROOT, f"{unit.name}: {config}"
        assert (kit / config.name).is_file(), f"{unit.name}: the kit has no {config.name}"
        folders.add(config.parent)
        installed = tmp_path / config.relative_to("/")
        shutil.copytree(kit, installed.parent)
        cfg = load_config(installed, schema)
        tls = getattr(cfg, "tls", None)
        assert tls is not None
        for part in (tls.cert, tls.key, tls.ca):
            assert part.is_file() and part.parent == installed.parent, part
        workspace = str(getattr(cfg, "workspace", None))
        assert workspace == svc["ReadWritePaths"] == svc["WorkingDirectory"], unit.name
        assert workspace == "/var/lib/" + svc["StateDirectory"]
        if isinstance(cfg, ClientConfig):
            assert cfg.name == instance
        else:
            assert isinstance(cfg, ServerConfig) and cfg.host == project.server.bind
    assert len(folders) == len(cases), "two kits would share a folder"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (it comes with systemd)")
    bin_dir = Path(sys.executable).parent
    for script in ("fl-server", "fl-client"):
        if not (bin_dir / script).exists():
            pytest.fail(f"{bin_dir / script} missing: install the project (pip install -e .)")
    # verify checks that ExecStart exists: point it at this environment's scripts
    for unit in (SERVER, CLIENT):
        text = unit.read_text().replace(INSTALLED_BIN, f"{bin_dir}/")
        (tmp_path / unit.name).write_text(text)
    for name in ("fl-server.service", "fl-client@site-1.service"):
        out = subprocess.run(
            [tool, "verify", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        # unknown keys and bad values are only warnings: any line about our units fails
        ours = [
            line
            for line in (out.stdout + out.stderr).splitlines()
            if "fl-server" in line or "fl-client" in line
        ]
        assert out.returncode == 0 and not ours, out.stdout + out.stderr
