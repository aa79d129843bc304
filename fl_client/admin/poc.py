"""``fl-poc``: run a whole federation on this machine and check the result bit for bit.

It provisions a throw-away project (a CA, and certificates for the server, both sites
and an admin), starts one server and two clients as real processes on loopback with
mutual TLS (``--insecure``: plain HTTP), submits a job, waits for it, downloads the
initial and the final global model and checks, chunk by chunk,
that the final model is the initial one with ``epsilon`` added once per round in the
model's dtype: what the built-in ``add_epsilon`` trainer and a weighted average of
identical updates must give. Neither model is ever loaded whole.

Every process it starts is stopped on the way out (SIGTERM, then SIGKILL after a grace
period), also on Ctrl-C and on SIGTERM to ``fl-poc`` itself: SIGTERM is turned into
``KeyboardInterrupt`` because that is the one exception asyncio lets through its
callbacks and tasks unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import aiohttp
import numpy as np
import yaml
from safetensors import safe_open

from common import wire
from common.config import (
    BUILTIN_TRAINER,
    MIB,
    AddEpsilonParams,
    AdminConfig,
    ClientConfig,
    JobConfig,
    ServerConfig,
)
from common.config_load import load_yaml, parse_config
from common.errors import FLError
from common.http_client import Api, make_session
from common.modelio import ModelReader
from common.tensorfile import element_window
from fl_client.admin import api, render
from fl_client.admin.progress import JobTracker
from fl_client.admin.provision import Project, provision

PROG = "fl-poc"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# package data, so that it is there however the project was installed
DEFAULT_JOB = importlib.resources.files("fl_client.admin") / "jobs" / "hello_numpy.yaml"
SITES = ("site-1", "site-2")
ADMIN = "poc-admin"
SEGMENT_MIB = 4
HEALTH_TIMEOUT_S = 30.0
HEALTH_POLL_S = 0.2
HEALTH_REQUEST_S = 2.0
STOP_GRACE_S = 10.0
LOG_TAIL_BYTES = 4096
VERIFY_CHUNK_BYTES = 8 * MIB


class PocFailure(FLError):
    """The run failed; ``detail`` (e.g. a log tail) is printed above the summary line."""

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a server and two clients locally and verify a job."
    )
    parser.add_argument(
        "--job", type=Path, metavar="JOB.yaml", help="the job to run (default: hello-numpy)"
    )
    parser.add_argument(
        "--workspace", type=Path, metavar="DIR", help="empty or new directory (default: a temp dir)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, metavar="S", help="limit for start-up and job"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workspace on success")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP instead of mutual TLS")
    return parser


def free_port() -> int:
    # Another process may take the port before the server binds it; fine for a local run.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"


class Processes:
    """The daemons this run started, each logging to a file in the workspace."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def start(self, name: str, module: str, config: Path) -> None:
        env = dict(os.environ)
        # The daemons import this checkout even when the project is not installed.
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])
        )
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self._files.append(log)
        self._procs[name] = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.logs,
            env=env,
            # Own session: a terminal's Ctrl-C reaches fl-poc only, which stops them in order.
            start_new_session=True,
        )

    def dead(self) -> dict[str, int]:
        return {n: rc for n, p in self._procs.items() if (rc := p.poll()) is not None}

    def check_alive(self) -> None:
        if gone := self.dead():
            name, rc = next(iter(gone.items()))
            raise PocFailure(f"{name} exited with code {rc}", detail=self.log_tails(gone))

    def log_tails(self, names: dict[str, int]) -> str:
        return "\n".join(
            f"--- last lines of {self.logs / n}.log ---\n{tail(self.logs / f'{n}.log')}"
            for n in names
        )

    def stop_all(self) -> None:
        """SIGTERM all, wait up to the grace period, SIGKILL what is left."""
        try:
            for p in self._procs.values():
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for p in self._procs.values():
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
        except KeyboardInterrupt:
            pass  # a second interrupt while stopping: no more grace
        finally:
            for p in self._procs.values():
                if p.poll() is None:
                    p.kill()
                p.wait()
            for f in self._files:
                f.close()


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def provision_project(workspace: Path, port: int) -> Path:
    """A project for this run under ``workspace/pki``, as ``fl-provision`` makes one."""
    project = Project.model_validate(
        {
            "name": "fl-poc",
            "server": {"host_name": "127.0.0.1", "port": port, "bind": "127.0.0.1"},
            "clients": [{"name": s} for s in SITES],
            "admins": [{"name": ADMIN}],
        }
    )
    pki = workspace / "pki"
    provision(project, pki, now=datetime.now(UTC))
    return pki


def tls_files(folder: Path) -> dict[str, str]:
    return {
        "cert": str(folder / "cert.pem"),
        "key": str(folder / "key.pem"),
        "ca": str(folder / "ca.pem"),
    }


def write_configs(workspace: Path, port: int, pki: Path | None) -> tuple[Path, dict[str, Path]]:
    """Write server.yaml and one file per site; each is validated before it is written.

    With ``pki`` (the provisioned project) every daemon gets its ``tls:`` section.
    """
    scheme = "http" if pki is None else "https"
    server: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "workspace": str(workspace / "server"),
        "segment_mib": SEGMENT_MIB,
    }
    if pki is not None:
        server["tls"] = tls_files(pki / "server")
    parse_config(server, ServerConfig, source="server.yaml")
    write_yaml(workspace / "server.yaml", server)
    clients: dict[str, Path] = {}
    for site in SITES:
        client: dict[str, Any] = {
            "name": site,
            "server_url": f"{scheme}://127.0.0.1:{port}",
            "workspace": str(workspace / site),
            "num_samples": 1,
        }
        if pki is not None:
            client["tls"] = tls_files(pki / "clients" / site)
        parse_config(client, ClientConfig, source=f"{site}.yaml")
        write_yaml(workspace / f"{site}.yaml", client)
        clients[site] = workspace / f"{site}.yaml"
    return workspace / "server.yaml", clients


def epsilon_of(job: JobConfig, source: Path) -> float:
    if job.trainer.name != BUILTIN_TRAINER:
        raise PocFailure(
            f"{source}: fl-poc can only verify add_epsilon jobs, not {job.trainer.name!r}"
        )
    # the job's schema has already checked the parameters; this fills in the defaults
    return AddEpsilonParams.model_validate(job.trainer.params).epsilon


async def wait_healthy(session: aiohttp.ClientSession, url: str, procs: Processes) -> None:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            while True:
                procs.check_alive()
                try:
                    timeout = aiohttp.ClientTimeout(total=HEALTH_REQUEST_S)
                    async with session.get(url + wire.HEALTH, timeout=timeout) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass  # not listening yet
                await asyncio.sleep(HEALTH_POLL_S)
    except TimeoutError:
        raise PocFailure(
            f"the server did not answer {wire.HEALTH} within {HEALTH_TIMEOUT_S:g} s",
            detail=procs.log_tails({"server": 0}),
        ) from None


class Watch:
    """Progress (as ``fl-admin watch`` shows it), a liveness check, the latest status."""

    def __init__(self, procs: Processes, display: render.Display) -> None:
        self.procs = procs
        self.last: wire.JobStatus | None = None
        self._tracker = JobTracker()
        self._display = display

    def describe(self) -> str:
        if self.last is None:
            return "the job was not submitted yet"
        job = self.last.job
        return f"job {job.state}, round {job.round}/{job.num_rounds}"

    def __call__(self, status: wire.JobStatus) -> None:
        self.last = status
        now = time.monotonic()
        self._display.update(self._tracker.update(status, now), now)
        self.procs.check_alive()


async def run_job(
    a: Api, job: JobConfig, watch: Watch, client_configs: dict[str, Path]
) -> wire.JobStatus:
    procs = watch.procs
    await wait_healthy(a.session, a.base_url, procs)
    for site, config in client_configs.items():
        await asyncio.to_thread(procs.start, site, "fl_client", config)
    job_id = (await api.submit(a, job)).job_id
    print(f"{PROG}: submitted job {job_id} ({job.name})", flush=True)
    return await api.wait_for_job(a, job_id, watch)


def verify_models(initial: Path, final: Path, rounds: int, epsilon: float) -> int:
    """Check final == initial + epsilon (rounds times); returns the model's data bytes."""
    with ModelReader(initial) as a, ModelReader(final) as b:
        if a.names != b.names:
            raise PocFailure(
                f"tensor names differ: initial {a.names[:3]}..., final {b.names[:3]}..."
            )
        for spec in a.layout.tensors:
            other = b.layout.tensor(spec.name)
            if (other.dtype, other.shape) != (spec.dtype, spec.shape):
                raise PocFailure(f"tensor {spec.name!r}: dtype or shape changed")
            dtype = spec.np_dtype
            step = element_window(spec, VERIFY_CHUNK_BYTES)
            got = np.empty(step, dtype=dtype)
            start = np.empty(step, dtype=dtype)
            for first in range(0, spec.numel, step):
                n = min(step, spec.numel - first)
                a.read_into(spec, first, start[:n])
                b.read_into(other, first, got[:n])
                expected = start[:n]
                for _ in range(rounds):
                    expected = (expected + dtype.type(epsilon)).astype(dtype)
                if not np.array_equal(got[:n], expected):
                    bad = np.flatnonzero(got[:n] != expected)
                    i = int(bad[0])
                    raise PocFailure(
                        f"tensor {spec.name!r}: {bad.size} of the {n} elements in "
                        f"[{first}, {first + n}) differ; element {first + i} is {got[i]!s}, "
                        f"expected {expected[i]!s} (initial {start[i]!s} + {epsilon} x {rounds})"
                    )
        with safe_open(str(final), framework="numpy") as f:
            names = set(f.keys())
        if names != set(b.names):
            raise PocFailure("safetensors reads different tensor names from the final model")
        return b.layout.data_bytes


async def drive(args: argparse.Namespace, workspace: Path, procs: Processes) -> str:
    """The whole run up to the verified result; returns the summary's details."""
    job_file: Path | None = args.job
    if job_file is None:
        with importlib.resources.as_file(DEFAULT_JOB) as job_file:
            raw_job = await asyncio.to_thread(load_yaml, job_file)
    else:
        raw_job = await asyncio.to_thread(load_yaml, job_file)
    job = parse_config(raw_job, JobConfig, source=str(job_file))
    epsilon = epsilon_of(job, job_file)
    port = free_port()
    pki = None if args.insecure else await asyncio.to_thread(provision_project, workspace, port)
    server_config, client_configs = await asyncio.to_thread(write_configs, workspace, port, pki)
    admin_settings: dict[str, Any] = {"server_url": f"http://127.0.0.1:{port}"}
    if pki is not None:
        admin_settings = {
            "server_url": f"https://127.0.0.1:{port}",
            "tls": tls_files(pki / "admins" / ADMIN),
        }
    admin = parse_config(admin_settings, AdminConfig, source=PROG)
    mode = "plain HTTP (--insecure)" if pki is None else "mutual TLS"
    print(f"{PROG}: workspace {workspace}, server {admin.server_url}, {mode}", flush=True)
    await asyncio.to_thread(procs.start, "server", "fl_server", server_config)
    async with make_session(identity=None, tls=admin.tls) as session:
        a = Api(session, admin.server_url, admin.timeouts)
        display = render.make_display(render.choose_mode(False, sys.stdout), sys.stdout)
        watch = Watch(procs, display)
        try:
            async with asyncio.timeout(args.timeout):
                status = await run_job(a, job, watch, client_configs)
        except TimeoutError:
            raise PocFailure(f"not done after {args.timeout:g} s: {watch.describe()}") from None
        finally:
            display.close()
        info = status.job
        if info.state != wire.JobState.FINISHED:
            raise PocFailure(f"job {info.state}: {info.reason or 'no reason given'}")
        if info.round != job.num_rounds:
            raise PocFailure(f"job finished after {info.round} of {job.num_rounds} rounds")
        out = workspace / "verify"
        await asyncio.to_thread(out.mkdir)
        initial, final = out / "initial.safetensors", out / "final.safetensors"
        await api.download_model(a, info.job_id, initial, round=0)
        await api.download_model(a, info.job_id, final, round=job.num_rounds)
    model_bytes = await asyncio.to_thread(verify_models, initial, final, job.num_rounds, epsilon)
    clients = {t.client for t in status.tasks if t.state == wire.TaskState.COMMITTED}
    return f"rounds={job.num_rounds} clients={len(clients)} model={model_bytes / MIB:.1f} MiB"


def prepare_workspace(given: Path | None) -> tuple[Path, bool]:
    """The workspace, and whether this run created it (only then may it delete it)."""
    if given is None:
        return Path(tempfile.mkdtemp(prefix="fl-poc-")), True
    existed = given.exists()
    if existed and any(given.iterdir()):
        raise PocFailure(f"--workspace {given} is not empty; give a new or empty directory")
    given.mkdir(parents=True, exist_ok=True)
    return given.resolve(), not existed


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    began = time.monotonic()
    try:
        workspace, created = prepare_workspace(args.workspace)
    except (FLError, OSError) as exc:
        print(f"{PROG}: FAILED {exc}")
        return 1
    (workspace / "logs").mkdir(exist_ok=True)
    procs = Processes(workspace / "logs")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    failure = ""
    try:
        details = asyncio.run(drive(args, workspace, procs))
    except PocFailure as exc:
        failure = str(exc)
        if exc.detail:
            print(exc.detail, file=sys.stderr)
    except (FLError, OSError) as exc:
        failure = str(exc)
        if gone := procs.dead():
            # A daemon's death is the cause; the error the run saw is its symptom.
            exits = ", ".join(f"{name} exited with code {rc}" for name, rc in gone.items())
            failure = f"{exits}; then: {failure}"
            print(procs.log_tails(gone), file=sys.stderr)
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
    wall = time.monotonic() - began
    if failure:
        reason = "; ".join(line.strip() for line in failure.splitlines() if line.strip())
        print(f"{PROG}: FAILED {reason} (wall={wall:.1f}s, workspace kept: {workspace})")
        return 1
    if created and not args.keep:
        shutil.rmtree(workspace, ignore_errors=True)
    print(f"{PROG}: OK {details} wall={wall:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
