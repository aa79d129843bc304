"""``fl-admin submit --model``: the job's initial model goes with it, resumably.

The real ``fl-admin`` uploads to a real server, through ``tests.proxy`` where a test
breaks or corrupts the traffic and counts the segment PUTs. The job must start from
exactly the uploaded tensors, and a broken upload run again must send only what the
server never acknowledged.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from common.uploads import describe
from common.wire import UploadFile
from tests.cluster import ApiError, Cluster, command, fl_admin, small_job, start_site
from tests.proxy import ProxyProcess, Rule

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
SEGMENT = MIB  # the Cluster's segment_mib is 1
WINDOW = 2
PUT_UPLOAD = r"^PUT /v1/admin/uploads/\S+/files/\S+/\d+ "
POST_UPLOAD = r"^POST /v1/admin/uploads "


def _model(
    path: Path, tensors: int = 4, shape: tuple[int, ...] = (512, 512)
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    values = {f"w{i}": rng.standard_normal(shape).astype(np.float32) for i in range(tensors)}
    save_file(values, str(path))
    return values


def _job_file(cluster: Cluster, **extra: object) -> Path:
    job = small_job(rounds=1, clients=1)
    del job["model"]
    return cluster.write_yaml("job.yaml", {**job, **extra})


def _admin_config(cluster: Cluster, url: str) -> Path:
    return cluster.write_yaml(
        "admin.yaml", {"server_url": url, "transfer": {"window": WINDOW, "max_segment_attempts": 3}}
    )


def _submit(config: Path, job: Path, model: Path) -> subprocess.CompletedProcess[str]:
    return fl_admin("--config", str(config), "submit", str(job), "--model", str(model))


def _uploads(cluster: Cluster) -> list[dict[str, object]]:
    return list(cluster.get("/v1/admin/uploads")["uploads"])


def _slow_submit(
    cluster: Cluster, proxy: ProxyProcess, config: Path, job: Path, model: Path
) -> subprocess.Popen[str]:
    """``submit --model`` in the background, its segments throttled to 4 MiB/s."""
    proxy.set_faults(Rule(match=PUT_UPLOAD, direction="up", throttle_bps=4 * MIB))
    args = ("--config", str(config), "submit", str(job), "--model", str(model))
    return subprocess.Popen(
        command("fl_client.admin", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_uploaded(cluster: Cluster, segments: int) -> None:
    cluster.wait_for(
        lambda: any(int(str(u["bytes_done"])) >= segments * SEGMENT for u in _uploads(cluster)),
        30,
        f"{segments} segments uploaded",
    )


def _assert_initial_model(cluster: Cluster, job_id: str, want: dict[str, np.ndarray]) -> None:
    got = load_file(str(cluster.download(job_id, 0, cluster.root / "initial.safetensors")))
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)


def test_submit_with_model_runs_the_job_from_the_uploaded_tensors(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cluster.start_server()
    start_site(cluster, "site-1")
    model = cluster.root / "mine.safetensors"
    want = _model(model)
    out = _submit(_admin_config(cluster, proxy.url), _job_file(cluster), model)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().splitlines()[-1]
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()
    _assert_initial_model(cluster, job_id, want)
    segments = -(-model.stat().st_size // SEGMENT)
    assert proxy.stats().count(PUT_UPLOAD) == segments
    # the staged copy went once the job had prepared its model from it
    assert _uploads(cluster) == []
    assert not any((cluster.root / "server" / "uploads").iterdir())


def test_broken_upload_resumes_when_the_same_command_runs_again(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cluster.start_server()
    start_site(cluster, "site-1")
    model = cluster.root / "big.safetensors"
    want = _model(model, tensors=8, shape=(1024, 1024))  # 32 MiB: 32 segments
    segments = -(-model.stat().st_size // SEGMENT)
    config, job = _admin_config(cluster, proxy.url), _job_file(cluster)
    first = _slow_submit(cluster, proxy, config, job, model)
    try:
        _wait_uploaded(cluster, 4)
        # every segment from now on is cut in the middle: the command gives up
        proxy.set_faults(Rule(match=PUT_UPLOAD, direction="up", cut_after_bytes=300_000))
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 1, err
    assert "gave up after 3 attempts" in err, err
    (held,) = _uploads(cluster)
    done = int(str(held["bytes_done"])) // SEGMENT
    assert 4 <= done < segments and not held["complete"]
    assert cluster.get("/v1/admin/jobs") == [], "a job was submitted without its model"

    proxy.clear_faults()
    proxy.reset_stats()
    again = _submit(config, job, model)
    assert again.returncode == 0, again.stderr
    assert re.search(rf"upload {held['upload_id']} resumes: the server holds", again.stderr)
    # only what the server never acknowledged went again: the segments in flight
    # when the first run gave up (at most a window) and those it never started
    st = proxy.stats()
    assert st.count(PUT_UPLOAD) == segments - done <= segments - 4
    assert st.count(POST_UPLOAD) == 1
    job_id = again.stdout.strip().splitlines()[-1]
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()
    _assert_initial_model(cluster, job_id, want)


def test_killed_upload_resends_at_most_one_window(cluster: Cluster, proxy: ProxyProcess) -> None:
    cluster.start_server()
    model = cluster.root / "big.safetensors"
    _model(model, tensors=4, shape=(1024, 1024))  # 16 MiB
    size = model.stat().st_size
    config, job = _admin_config(cluster, proxy.url), _job_file(cluster)
    first = _slow_submit(cluster, proxy, config, job, model)
    try:
        _wait_uploaded(cluster, 3)
        time.sleep(0.3)  # well inside the next segments
    finally:
        first.kill()
        first.communicate()
    proxy.clear_faults()
    again = _submit(config, job, model)
    assert again.returncode == 0, again.stderr
    # the killed run's segments in flight are all that was sent twice
    st = proxy.stats()
    resent = st.body(PUT_UPLOAD, "up") - size
    assert 0 < resent <= WINDOW * SEGMENT, resent
    assert st.count(PUT_UPLOAD) <= -(-size // SEGMENT) + WINDOW


def test_corrupted_segment_is_refused_and_sent_again(cluster: Cluster, proxy: ProxyProcess) -> None:
    cluster.start_server()
    start_site(cluster, "site-1")
    model = cluster.root / "mine.safetensors"
    want = _model(model)
    proxy.set_faults(Rule(match=PUT_UPLOAD, direction="up", corrupt_at_byte=5000))
    out = _submit(_admin_config(cluster, proxy.url), _job_file(cluster), model)
    assert out.returncode == 0, out.stderr
    st = proxy.stats()
    assert st.corruptions == 1
    assert st.count(PUT_UPLOAD) == -(-model.stat().st_size // SEGMENT) + 1
    server_log = (cluster.root / "server.log").read_text()
    assert re.search(r"PUT /v1/admin/uploads/\S+ -> integrity_error: .*digest", server_log)
    job_id = out.stdout.strip().splitlines()[-1]
    assert cluster.wait_job(job_id, timeout=60)["job"]["state"] == "finished", cluster.logs()
    _assert_initial_model(cluster, job_id, want)


def test_job_file_with_a_model_and_model_option_is_refused(cluster: Cluster) -> None:
    cluster.start_server()
    model = cluster.root / "mine.safetensors"
    _model(model, tensors=1, shape=(4,))
    job = cluster.write_yaml("job.yaml", small_job(rounds=1, clients=1))
    out = fl_admin("--server", cluster.url, "submit", str(job), "--model", str(model))
    assert out.returncode == 2
    assert "model: section" in out.stderr and "--model" in out.stderr, out.stderr
    assert out.stdout == ""
    assert _uploads(cluster) == []


def test_bad_shard_name_is_refused_before_anything_is_sent(
    cluster: Cluster, proxy: ProxyProcess
) -> None:
    cluster.start_server()
    folder = cluster.root / "shards"
    folder.mkdir()
    _model(folder / "a.safetensors", tensors=1, shape=(4,))
    index = {"metadata": {}, "weight_map": {"w0": "../x.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    out = _submit(_admin_config(cluster, proxy.url), _job_file(cluster), folder)
    assert out.returncode == 2, out.stderr
    assert "'../x.safetensors'" in out.stderr and "path separator" in out.stderr, out.stderr
    assert proxy.stats().requests == 0


def test_server_refuses_bad_names_and_incomplete_uploads(cluster: Cluster) -> None:
    """What the server checks itself, whatever the client does."""
    cluster.start_server()
    files = [{"name": "../x.safetensors", "size": 10, "segment_digests": ["0" * 16]}]
    with pytest.raises(ApiError) as bad:
        cluster.request(
            "POST", "/v1/admin/uploads", {"segment_bytes": SEGMENT, "files": files, "digest": "x"}
        )
    assert bad.value.status == 400 and "path separator" in bad.value.body["message"]
    job = {**small_job(rounds=1, clients=1), "model": {"kind": "uploaded", "upload_id": "a" * 32}}
    with pytest.raises(ApiError) as missing:
        cluster.submit(job)
    assert missing.value.status == 404, missing.value.body
    # a session with nothing sent yet: a job on it waits for no model, it is refused
    desc = describe(
        SEGMENT, [UploadFile(name="model.safetensors", size=10, segment_digests=["0" * 16])]
    )
    session = cluster.request("POST", "/v1/admin/uploads", desc.model_dump())
    assert session["upload_id"] == desc.digest and not session["complete"]
    job["model"] = {"kind": "uploaded", "upload_id": desc.digest}
    with pytest.raises(ApiError) as incomplete:
        cluster.submit(job)
    assert incomplete.value.status == 409, incomplete.value.body
    assert "1 of 1 segments missing" in incomplete.value.body["message"]
