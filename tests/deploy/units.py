"""Deployment files in tests: systemd unit files, pyproject's console scripts, and
startup kits made by the real ``fl-provision`` command."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.cluster import REPO

DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent  # this environment's console scripts


def console_scripts() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    scripts: dict[str, str] = data["project"]["scripts"]
    return scripts


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def installed_script(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} missing: install the project (pip install -e .)")
    return path


def provision(project: Path, out: Path) -> Path:
    """``fl-provision PROJECT -o OUT`` with this environment's console script; ``out``."""
    done = subprocess.run(
        [str(installed_script("fl-provision")), str(project), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out
