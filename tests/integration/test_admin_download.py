"""``fl-admin download`` through a fault-injecting proxy: it resumes, and checks what it keeps.

The job's initial model (round 0) is ready as soon as the job runs, without any site:
the tests download it with the real command, through ``tests.proxy``, which cuts,
corrupts or slows the model's range requests and counts them. Whatever happens on the
way, the file written must be the server's, byte for byte, and a fault may cost only
the segments that were in flight: at most one window.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.cluster import REPO, ApiError, Cluster, command, fl_admin, small_job
from tests.proxy import ProxyProcess, Rule

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
WINDOW = 4  # the default transfer.window
ADMIN_MODEL = r"^GET /v1/admin/jobs/\S+/model\?round=0 "


def _job_with_model(cluster: Cluster) -> str:
    """A job whose initial model is on the server (no site joins, so it stays there)."""
    cluster.start_server()
    job_id = cluster.submit(small_job(rounds=1, clients=1, tensors=16, shape=[512, 512]))
    cluster.wait_for(
        lambda: cluster.status(job_id)["job"]["state"] == "running", 30, "the initial model"
    )
    return job_id


def _server_model(cluster: Cluster, job_id: str) -> bytes:
    return (
        cluster.root / "server" / "jobs" / job_id / "models" / "round-0.safetensors"
    ).read_bytes()


def _segments(cluster: Cluster, job_id: str) -> int:
    """Segments of the model: 16 MiB of tensors and a header, in segments of 1 MiB."""
    return -(-len(_server_model(cluster, job_id)) // MIB)


def _download(proxy: ProxyProcess, job_id: str, out: Path) -> subprocess.CompletedProcess[str]:
    return fl_admin("--server", proxy.url, "download", job_id, "--round", "0", "-o", str(out))


def _assert_done(cluster: Cluster, job_id: str, out: Path) -> None:
    assert out.read_bytes() == _server_model(cluster, job_id)
    assert not (out.parent / f".{out.name}.fl-download").exists(), "temporaries left"


def test_a_cut_segment_is_fetched_again_and_nothing_else(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    job_id = _job_with_model(cluster)
    proxy.set_faults(Rule(match=ADMIN_MODEL, direction="down", cut_after_bytes=300_000, limit=1))
    out = cluster.root / "model.safetensors"
    run = _download(proxy, job_id, out)
    assert run.returncode == 0, run.stderr
    size = len(_server_model(cluster, job_id))
    assert run.stdout == f"wrote {size} bytes (16.0 MiB) to {out}\n"
    st = proxy.stats()
    assert st.cuts == 1, st
    assert st.count(ADMIN_MODEL) == _segments(cluster, job_id) + 1, st.request_lines
    assert re.search(r"segment \d+ .*attempt 1 failed", run.stderr), run.stderr
    _assert_done(cluster, job_id, out)


def test_a_corrupted_segment_is_refused_and_fetched_again(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    job_id = _job_with_model(cluster)
    proxy.set_faults(Rule(match=ADMIN_MODEL, direction="down", corrupt_at_byte=5000))
    out = cluster.root / "model.safetensors"
    run = _download(proxy, job_id, out)
    assert run.returncode == 0, run.stderr
    st = proxy.stats()
    assert st.corruptions == 1, st
    assert st.count(ADMIN_MODEL) == _segments(cluster, job_id) + 1, st.request_lines
    assert re.search(r"digest \w+, manifest says \w+", run.stderr), run.stderr
    _assert_done(cluster, job_id, out)


def _journal_lines(work: Path) -> int:
    journals = list(work.glob("*.segments")) if work.exists() else []
    return sum(len(j.read_text().splitlines()) for j in journals)


def test_a_killed_download_resumes_when_run_again(cluster: Cluster, proxy: ProxyProcess) -> None:
    job_id = _job_with_model(cluster)
    segments = _segments(cluster, job_id)
    # 16 MiB at 4 MiB/s: about 4 s, killed once a few segments are verified
    proxy.set_faults(Rule(match=ADMIN_MODEL, direction="down", throttle_bps=4 * MIB))
    out = cluster.root / "model.safetensors"
    work = cluster.root / ".model.safetensors.fl-download"
    args = command(
        "fl_client.admin", "--server", proxy.url, "download", job_id, "--round", "0", "-o", str(out)
    )
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cluster.wait_for(lambda: _journal_lines(work) >= 4, 30, "four verified segments")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    verified = _journal_lines(work)
    assert verified < segments, "the download finished before the kill"
    assert not out.exists()
    fetched_first = proxy.stats().count(ADMIN_MODEL)
    proxy.clear_faults()
    proxy.reset_stats()

    run = _download(proxy, job_id, out)
    assert run.returncode == 0, run.stderr
    assert re.search(r"already on disk \(verified\), resuming", run.stderr), run.stderr
    again = proxy.stats().count(ADMIN_MODEL)
    assert again <= segments - verified
    # only what was in flight at the kill was fetched twice
    assert fetched_first + again <= segments + WINDOW, (fetched_first, again)
    _assert_done(cluster, job_id, out)


def test_output_is_a_file_as_before_and_is_replaced_on_a_new_run(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    job_id = _job_with_model(cluster)
    out = cluster.root / "model.safetensors"
    out.write_bytes(b"an older download")
    run = fl_admin("--server", proxy.url, "--json", "download", job_id, "-o", str(out))
    assert run.returncode == 0, run.stderr
    size = len(_server_model(cluster, job_id))
    assert json.loads(run.stdout) == {"path": str(out), "bytes": size, "files": [str(out)]}
    # not a terminal: a line when it starts, one when it is done
    assert len(run.stderr.splitlines()) == 2, run.stderr
    _assert_done(cluster, job_id, out)

    late = fl_admin("--server", proxy.url, "download", job_id, "--round", "4", "-o", str(out))
    assert late.returncode == 1
    assert f"job {job_id} has no global model for round 4" in late.stderr
    assert out.read_bytes() == _server_model(cluster, job_id)  # left as it was


def test_the_manifest_route_names_the_job_and_round(cluster: Cluster) -> None:
    job_id = _job_with_model(cluster)
    route = f"/v1/admin/jobs/{job_id}/manifest"
    latest = cluster.get(route)  # round 0: the only model so far
    assert latest == cluster.get(route + "?round=0")
    assert latest["layout"]["data_offset"] + 16 * MIB == len(_server_model(cluster, job_id))
    for query, status, words in [
        ("?round=1", 404, f"job {job_id} has no global model for round 1"),
        ("?round=-1", 400, "'round' must be a round number"),
        ("?round=x", 400, "'round' must be a round number"),
    ]:
        with pytest.raises(ApiError) as err:
            cluster.get(route + query)
        assert err.value.status == status and words in err.value.body["message"], err.value.body
    with pytest.raises(ApiError) as err:
        cluster.get("/v1/admin/jobs/nope/manifest")
    assert err.value.status == 404
