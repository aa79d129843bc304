"""``fl-admin watch`` and ``status`` against a real server: JSON lines, plain lines, a TTY."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from typing import Any

import pytest

from tests.cluster import REPO, Cluster, command, fl_admin, kill, small_job

pytestmark = pytest.mark.integration

ROUNDS = 2
FAST_SITE: dict[str, Any] = {"heartbeat_interval_s": 0.2}


def admin(cluster: Cluster, *args: str) -> list[str]:
    """``fl-admin`` against this cluster's server."""
    return command("fl_client.admin", "--server", cluster.url, *args)


def start_job(cluster: Cluster, **job: Any) -> str:
    cluster.start_server()
    for site in ("site-1", "site-2"):
        cluster.start_client(site, **FAST_SITE)
    return cluster.submit(small_job(rounds=ROUNDS, **job))


def test_watch_json_lines_until_finished(cluster: Cluster) -> None:
    cluster.start_server()
    job_id = cluster.submit(small_job(rounds=ROUNDS, tensors=16))  # waits for its two sites
    out, err = cluster.root / "watch.out", cluster.root / "watch.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        watch = subprocess.Popen(
            admin(cluster, "--json", "watch", job_id, "--interval", "0.1"),
            cwd=REPO,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        # The sites start once fl-admin has reported the job: the job takes less time
        # than fl-admin takes to start, and the lines must show it before it is over.
        cluster.wait_for(lambda: out.read_text() != "", 60, "fl-admin watch to report")
        for site in ("site-1", "site-2"):
            cluster.start_client(site, **FAST_SITE)
        watch.wait(120)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, out.read_text() + err.read_text() + cluster.logs()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) >= 2
    assert all(line["job_id"] == job_id and line["num_rounds"] == ROUNDS for line in lines)
    done = [line["rounds_done"] for line in lines]
    assert done == sorted(done)  # never goes back
    assert [line["ts"] for line in lines] == sorted(line["ts"] for line in lines)
    last = lines[-1]
    assert last["state"] == "finished" and last["rounds_done"] == ROUNDS
    model_bytes = cluster.status(job_id)["job"]["model_bytes"]
    assert [(s["client"], s["round"], s["activity"]) for s in last["sites"]] == [
        ("site-1", ROUNDS, "done"),
        ("site-2", ROUNDS, "done"),
    ]
    assert all(s["bytes_done"] == s["bytes_total"] == model_bytes for s in last["sites"])
    for line in lines:
        for s in line["sites"]:
            assert s["activity"] in ("waiting", "downloading", "training", "uploading", "done")
            if s["bytes_per_s"] is not None:
                assert s["bytes_per_s"] >= 0


def test_watch_plain_lines_and_status(cluster: Cluster) -> None:
    job_id = start_job(cluster)
    out = fl_admin("--server", cluster.url, "watch", job_id, "--interval", "0.1")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"job {job_id} (test-job): ")
    assert f"job {job_id} (test-job): finished after {ROUNDS} of {ROUNDS} rounds" in lines
    for site in ("site-1", "site-2"):
        assert any(line.startswith(f"  round {ROUNDS} {site} done ") for line in lines), lines
    assert "\x1b[" not in out.stdout  # no terminal codes in a pipe

    status = fl_admin("--server", cluster.url, "status", job_id)
    assert status.returncode == 0, status.stderr
    text = status.stdout.splitlines()
    assert text[0] == f"job {job_id} (test-job): finished after {ROUNDS} of {ROUNDS} rounds"
    assert "ROUND  STATE   UPDATES  DURATION" in text
    assert sum(line.startswith(("1 ", "2 ")) and " closed  2 " in line for line in text) == 2
    assert sum("done" in line and "(100%)" in line for line in text) == 2


def test_watch_exits_nonzero_when_the_job_is_aborted(cluster: Cluster) -> None:
    cluster.start_server()
    cluster.start_client("site-1", **FAST_SITE)
    job_id = cluster.submit(small_job(clients=2))  # waits for a second site forever
    watch = subprocess.Popen(
        admin(cluster, "watch", job_id, "--interval", "0.1"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        assert watch.poll() is None  # still watching a job that is not over
        cluster.request("POST", f"/v1/admin/jobs/{job_id}/abort")
    finally:
        stdout, stderr = watch.communicate(timeout=60)
    assert watch.returncode == 1
    assert f"job {job_id} (test-job): aborted after 0 of 3 rounds" in stdout
    assert f"fl-admin: job {job_id} aborted: aborted by admin" in stderr


def test_watch_draws_bars_on_a_terminal(cluster: Cluster) -> None:
    job_id = start_job(cluster, tensors=16)
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "140", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        admin(cluster, "watch", job_id, "--interval", "0.1"),
        cwd=REPO,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                shown += data
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    assert proc.stderr is not None
    with proc.stderr:
        errors = proc.stderr.read().decode()
    assert proc.wait(30) == 0, errors
    text = shown.decode("utf-8", "replace")
    assert f"job {job_id} (test-job): finished after {ROUNDS} of {ROUNDS} rounds" in text
    assert "━" in text and "\x1b[" in text  # drawn bars, in place
    assert "SITE" in text and "RATE" in text and "ETA" in text


@pytest.mark.parametrize("command", ["watch", "wait"])
def test_watch_and_wait_ride_out_a_server_restart(cluster: Cluster, command: str) -> None:
    cluster.start_server()
    cluster.start_client("site-1", **FAST_SITE)
    job_id = cluster.submit(small_job(rounds=ROUNDS, clients=2))  # waits for site-2
    args = ["watch", job_id, "--interval", "0.1"] if command == "watch" else ["wait", job_id]
    out, err = cluster.root / f"{command}.out", cluster.root / f"{command}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(admin(cluster, *args), cwd=REPO, stdout=stdout, stderr=stderr)
    try:
        # its first line: fl-admin is up and following the job before the server goes
        cluster.wait_for(lambda: out.read_text() != "", 60, f"fl-admin {command} to report")
        kill(cluster, "server")
        cluster.wait_for(
            lambda: "retrying in 2 s" in err.read_text(), 60, f"fl-admin {command} to retry"
        )
        assert proc.poll() is None  # it keeps going
        cluster.start_server()
        cluster.start_client("site-2", **FAST_SITE)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout_text, stderr_text = out.read_text(), err.read_text()
    assert proc.returncode == 0, stdout_text + stderr_text + cluster.logs()
    finished = {
        "watch": f"job {job_id} (test-job): finished after {ROUNDS} of {ROUNDS} rounds",
        "wait": f"job {job_id}: finished after {ROUNDS}/{ROUNDS} rounds",
    }[command]
    assert finished in stdout_text.splitlines(), stdout_text
