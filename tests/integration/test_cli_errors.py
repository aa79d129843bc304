"""The real commands, given a bad file, stop with one message naming the file and field."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cluster import Cluster, fl_admin, run, small_job

pytestmark = pytest.mark.integration


def _says(out: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("module", "text", "words"),
    [
        ("fl_server", "workspace: /tmp/x\nport: 80000\n", ["port", "less than or equal"]),
        ("fl_server", "workspace: /tmp/x\ncolour: red\n", ["colour", "unknown key"]),
        (
            "fl_server",
            "workspace: /tmp/x\ntimeouts:\n  communication_timeout: -5\n",
            ["timeouts.communication_timeout", "greater than 0", "-5"],
        ),
        (
            "fl_client",
            "name: site-1\nserver_url: http://h:1\nworkspace: /tmp/x\nnum_samples: lots\n",
            ["num_samples", "integer"],
        ),
        (
            "fl_client",
            "name: site-1\nserver_url: http://h:1\nworkspace: /tmp/x\n"
            "timeouts:\n  streaming_ack_wait: 0\n",
            ["timeouts.streaming_ack_wait", "greater than 0"],
        ),
        ("fl_client", "name: site-1\nworkspace: /tmp/x\n", ["server_url", "required"]),
    ],
)
def test_daemons_refuse_a_bad_config(
    tmp_path: Path, module: str, text: str, words: list[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    _says(run(module, "--config", str(path)), 2, str(path), *words)


@pytest.mark.parametrize("module", ["fl_server", "fl_client"])
def test_daemons_refuse_a_missing_config(tmp_path: Path, module: str) -> None:
    path = tmp_path / "nowhere.yaml"
    _says(run(module, "--config", str(path)), 2, str(path), "file not found")


def test_admin_refuses_a_bad_job_file_before_sending_it(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_server()
    job = tmp_path / "job.yaml"
    job.write_text("name: j\nnum_rounds: 0\nmin_clients: 1\nmodel: {kind: generated}\n")
    out = fl_admin("--server", cluster.url, "submit", str(job))
    _says(out, 2, str(job), "num_rounds", "greater than 0", "model.num_tensors", "required")
    assert cluster.get("/v1/admin/jobs") == []
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(small_job(rounds=1, clients=1)))
    out = fl_admin("--server", cluster.url, "submit", str(good))
    assert out.returncode == 0, out.stderr
    assert [j["job_id"] for j in cluster.get("/v1/admin/jobs")] == [out.stdout.strip()]


def test_client_says_why_its_workspace_cannot_be_created(tmp_path: Path) -> None:
    # a regular file where a folder must go: refused for root as well as for anyone else
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    workspace = blocker / "workspace"
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "site-1", "server_url": "http://127.0.0.1:9", "workspace": str(workspace)}
        )
    )
    out = run("fl_client", "--config", str(path))
    _says(out, 1)
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fl-client: workspace {workspace}"), out.stderr
    assert last.endswith("cannot create: Not a directory"), out.stderr


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: &a [*a]\n", "refers to the node that holds it"),
        ("a: " + "[" * 200 + "]" * 200 + "\n", "nested more than 64 levels deep"),
        (
            "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
            + "".join(
                f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            "aliases stand for more than",
        ),
    ],
)
def test_admin_refuses_a_self_referencing_or_exploding_job_file(
    cluster: Cluster, tmp_path: Path, text: str, words: str
) -> None:
    cluster.start_server()
    job = tmp_path / "job.yaml"
    job.write_text(text)
    out = fl_admin("--server", cluster.url, "submit", str(job))
    _says(out, 2, str(job), words)
    assert "Traceback" not in out.stderr
    assert cluster.get("/v1/admin/jobs") == []
