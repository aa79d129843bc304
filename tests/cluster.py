"""Real server and client processes on loopback, for integration tests and benchmarks.

Everything goes through the real commands (``python -m fl_server`` / ``fl_client``)
and the real HTTP API; nothing is mocked. Each process logs to a file in the test's
directory, shown when a test fails. With ``tls=True`` the cluster provisions a project
under ``root/pki`` (with the code ``fl-provision`` runs), every daemon gets its
credentials, and the helpers below talk HTTPS with the admin's (or a site's)
certificate.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.plugins import PLUGINS

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return int(self.popen.returncode)

    def tail(self, n: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _join_cgroup(procs_file: Path) -> None:
    procs_file.write_text(str(os.getpid()))


def spawn(
    name: str,
    args: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    cgroup_procs: Path | None = None,
) -> Proc:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    f = open(log, "ab")  # noqa: SIM115 - the child owns it
    join = None if cgroup_procs is None else (lambda: _join_cgroup(cgroup_procs))
    popen = subprocess.Popen(
        [sys.executable, *args],
        stdout=f,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=REPO,
        start_new_session=True,
        preexec_fn=join,
    )
    f.close()
    return Proc(name, popen, log)


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


@dataclass
class Cluster:
    root: Path
    segment_mib: int = 1
    server_extra: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    server: Proc | None = None
    clients: dict[str, Proc] = field(default_factory=dict)
    cgroup_procs: Path | None = None  # daemons start inside this cgroup, when set
    tls: bool = False  # mutual TLS, with a project provisioned under root/pki
    admin: str = "admin"  # the admin whose certificate the helpers present

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    def credentials(self, role: str, name: str) -> dict[str, str]:
        """The ``tls:`` section of ``role`` (server, client, admin) ``name``.

        Provisions it on first use: the project file lists every participant asked for
        so far and the re-run keeps the CA and everyone provisioned before.
        """
        from datetime import UTC, datetime

        from fl_client.admin.provision import Project, provision

        folder = {
            "server": self.pki / "server",
            "client": self.pki / "clients" / name,
            "admin": self.pki / "admins" / name,
        }[role]
        if not (folder / "cert.pem").exists():
            project_file = self.pki / "project.json"
            data: dict[str, Any] = (
                json.loads(project_file.read_text())
                if project_file.exists()
                else {
                    "name": "test-project",
                    "server": {"host_name": "127.0.0.1", "port": self.port, "bind": "127.0.0.1"},
                    "clients": [],
                    "admins": [],
                }
            )
            if role != "server":
                data[role + "s"].append({"name": name})
            self.pki.mkdir(parents=True, exist_ok=True)
            project_file.write_text(json.dumps(data))
            provision(Project.model_validate(data), self.pki, now=datetime.now(UTC))
        return {k: str(folder / f"{k}.pem") for k in ("cert", "key", "ca")}

    def ssl_context(self, client: str | None = None) -> ssl.SSLContext | None:
        """The context the HTTP helpers use: a site's certificate, else the admin's."""
        if not self.tls:
            return None
        files = (
            self.credentials("client", client) if client else self.credentials("admin", self.admin)
        )
        ctx = ssl.create_default_context(cafile=files["ca"])
        ctx.load_cert_chain(files["cert"], files["key"])
        return ctx

    def write_yaml(self, name: str, data: dict[str, Any]) -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(data))
        return path

    def start_server(
        self, wait: bool = True, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> Proc:
        cfg = {
            "host": "127.0.0.1",
            "port": self.port,
            "workspace": str(self.root / "server"),
            "segment_mib": self.segment_mib,
            **({"tls": self.credentials("server", "server")} if self.tls else {}),
            **self.server_extra,
        }
        path = self.write_yaml("server.yaml", cfg)
        self.server = spawn(
            "server",
            ["-m", "fl_server", "--config", str(path), *args],
            self.root / "server.log",
            env=env,
            cgroup_procs=self.cgroup_procs,
        )
        if wait:
            self.wait_healthy()
        return self.server

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.server is not None
            if not self.server.alive():
                raise RuntimeError(f"server exited:\n{self.server.tail()}")
            try:
                self.get("/v1/health")
                return
            except (OSError, ApiError):
                time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def start_client(
        self,
        name: str,
        num_samples: int = 1,
        *,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        **extra: Any,
    ) -> Proc:
        cfg = {
            "name": name,
            "server_url": self.url,
            "workspace": str(self.root / name),
            "num_samples": num_samples,
            "allowed_trainers": PLUGINS,
            **({"tls": self.credentials("client", name)} if self.tls else {}),
            **extra,
        }
        path = self.write_yaml(f"{name}.yaml", cfg)
        proc = spawn(
            name,
            ["-m", "fl_client", "--config", str(path), *args],
            self.root / f"{name}.log",
            env=env,
            cgroup_procs=self.cgroup_procs,
        )
        self.clients[name] = proc
        return proc

    def stop_all(self) -> None:
        for p in self.clients.values():
            p.stop()
        if self.server is not None:
            self.server.stop()

    def logs(self) -> str:
        procs = [p for p in [self.server, *self.clients.values()] if p is not None]
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in procs)

    # HTTP
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        *,
        as_client: str | None = None,
    ) -> Any:
        """One JSON call; with TLS as ``as_client``'s site certificate, else the admin's."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(
                req, timeout=60, context=self.ssl_context(as_client)
            ) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, json.loads(exc.read() or b"{}")) from None
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def submit(self, job: dict[str, Any]) -> str:
        return str(self.request("POST", "/v1/admin/jobs", {"config": job})["job_id"])

    def status(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/v1/admin/jobs/{job_id}")
        return result

    def wait_job(
        self,
        job_id: str,
        timeout: float = 120.0,
        states: tuple[str, ...] = ("finished", "failed", "aborted"),
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(job_id)
            if st["job"]["state"] in states:
                return st
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not done in {timeout} s:\n{self.logs()}")

    def wait_for(self, pred: Any, timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{what} not reached in {timeout} s:\n{self.logs()}")

    def wait_clients(self, *names: str, timeout: float = 60.0) -> None:
        """Until the server has seen every named site."""

        def seen() -> bool:
            have = {c["name"] for c in self.get("/v1/admin/clients")}
            return set(names) <= have

        self.wait_for(seen, timeout, f"clients {names} registered")

    def model_path(self, job_id: str, rnd: int) -> Path:
        return self.root / "server" / "jobs" / job_id / "models" / f"round-{rnd}.safetensors"

    def download(self, job_id: str, rnd: int, dest: Path) -> Path:
        url = f"{self.url}/v1/admin/jobs/{job_id}/model?round={rnd}"
        ctx = self.ssl_context()
        with urllib.request.urlopen(url, timeout=60, context=ctx) as resp, open(dest, "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
        return dest


def small_job(
    name: str = "test-job",
    *,
    rounds: int = 3,
    clients: int = 2,
    tensors: int = 6,
    shape: list[int] | None = None,
    epsilon: float = 0.001,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "num_rounds": rounds,
        "min_clients": clients,
        "model": {
            "kind": "generated",
            "num_tensors": tensors,
            "tensor_shape": shape or [301, 257],
            "dtype": "float32",
            "seed": 7,
        },
        "trainer": {"name": "add_epsilon", "params": {"epsilon": epsilon}},
        **extra,
    }


# Helpers for fault and resume tests.

# request lines of the two bulk routes, for proxy rules and counts
PUT_SEGMENT = r"^PUT /v1/tasks/\S+/upload/\d+ "
GET_MODEL = r"^GET /v1/tasks/\S+/model "


# a site that reports and retries at once, so that a fault test sees it react quickly
FAST_SITE: dict[str, Any] = {"heartbeat_interval_s": 0.5, "retry_backoff_max_s": 1.0}


def start_site(cluster: Cluster, name: str, *, via: str | None = None, **extra: Any) -> Proc:
    """Start client ``name`` with ``FAST_SITE`` settings (``extra`` wins), talking to the
    server through the proxy at ``via`` when given."""
    settings = {**FAST_SITE, **({"server_url": via} if via is not None else {}), **extra}
    return cluster.start_client(name, **settings)


def log_text(cluster: Cluster, name: str) -> str:
    """The whole log so far of the server (``"server"``) or of the client ``name``."""
    path = cluster.root / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_log(
    cluster: Cluster, name: str, pattern: str, *, after: int = 0, timeout: float = 20.0
) -> re.Match[str]:
    """The first match of ``pattern`` in the log of ``name`` past byte ``after``, waiting
    up to ``timeout`` seconds for it to appear."""
    found: list[re.Match[str]] = []

    def seen() -> bool:
        m = re.search(pattern, log_text(cluster, name)[after:])
        if m:
            found.append(m)
        return m is not None

    cluster.wait_for(seen, timeout, f"{pattern!r} in the log of {name}")
    return found[0]


def in_phase(
    cluster: Cluster, job_id: str, site: str, phase: str, rnd: int = 1, *, moved: int = 1
) -> bool:
    """Whether ``site``'s task of round ``rnd`` is in ``phase`` with ``moved`` bytes done."""
    tasks = tasks_of(cluster.status(job_id), site, rnd)
    return bool(tasks) and tasks[0]["phase"] == phase and tasks[0]["bytes_done"] >= moved


def command(module: str, *args: str) -> list[str]:
    """The real command ``python -m <module> <args>``: what the console scripts run."""
    return [sys.executable, "-m", module, *args]


def run(module: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a command to its end from the checkout; its output as text."""
    return subprocess.run(
        command(module, *args), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def fl_admin(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return run("fl_client.admin", *args, timeout=timeout)


def kill(cluster: Cluster, name: str) -> None:
    """SIGKILL the server (``"server"``) or a client, and reap it: no clean-up runs."""
    proc = cluster.server if name == "server" else cluster.clients[name]
    assert proc is not None
    proc.stop(signal.SIGKILL)


def tasks_of(status: dict[str, Any], client: str, rnd: int | None = None) -> list[dict[str, Any]]:
    """The tasks of ``client`` in a job status, optionally only those of round ``rnd``."""
    return [
        t for t in status["tasks"] if t["client"] == client and (rnd is None or t["round"] == rnd)
    ]


def assert_exact_model(
    cluster: Cluster, job_id: str, rounds: int, weights: list[int], epsilon: float = 0.001
) -> None:
    """The job's model after ``rounds`` is exactly numpy's (see ``tests.expected``)."""
    import numpy as np
    from safetensors.numpy import load_file

    from tests.expected import expected_after

    initial = load_file(str(cluster.download(job_id, 0, cluster.root / f"{job_id}-0.st")))
    final = load_file(str(cluster.download(job_id, rounds, cluster.root / f"{job_id}-final.st")))
    want = expected_after(initial, rounds, weights, epsilon)
    assert sorted(final) == sorted(want)
    for name, w in want.items():
        assert final[name].dtype == w.dtype and final[name].shape == w.shape, name
        np.testing.assert_array_equal(final[name], w, err_msg=name)
    first = sorted(initial)[0]
    assert not np.array_equal(final[first], initial[first]), "the model did not move"
