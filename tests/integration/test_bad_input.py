"""Bad input gets a clear error and changes nothing.

Two sites, driven request by request (``tests.rawclient``), send the real server every
kind of bad request this project knows of. After each one, the job's state (status,
rounds, tasks, segments held) and the files of its global models are exactly what they
were before; then both sites send good updates and the job ends with exactly the model
numpy computes, as if the bad requests had never come.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.digest import segment_digest
from common.tensorfile import Layout, Manifest, TensorSpec, plan_layout
from tests.cluster import ApiError, Cluster, assert_exact_model, small_job
from tests.rawclient import RawSite, Reply, file_digest, file_segments, write_update

pytestmark = pytest.mark.integration

EPSILON = 0.001
WEIGHTS = {"site-a": 1, "site-b": 3}


def _fingerprint(cluster: Cluster, job_id: str, owners: dict[str, RawSite]) -> Any:
    """Everything a bad request must leave alone: job status, segments held, model files."""
    models = cluster.root / "server" / "jobs" / job_id / "models"
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(models.iterdir())}
    held = {}
    for tid, site in owners.items():
        reply = site.upload_status(tid)
        held[tid] = reply.body if reply.status == 200 else reply.status
    return cluster.status(job_id), held, files


@contextmanager
def _unchanged(snapshot: Callable[[], Any]) -> Iterator[None]:
    before = snapshot()
    yield
    assert snapshot() == before


def _refused(reply: Reply, status: int, code: str, *words: str) -> None:
    assert reply.status == status, reply
    assert reply.code == code, reply
    for w in words:
        assert w in reply.message, reply


def _plus_epsilon(name: str, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x + x.dtype.type(EPSILON)
    return out


def _layout_with(manifest: Manifest, change: Callable[[list[TensorSpec]], list[Any]]) -> Layout:
    specs = change(list(manifest.layout.tensors))
    layout, _ = plan_layout(specs)
    return layout


def _spec_tuples(specs: list[TensorSpec]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(s.name, s.dtype, s.shape) for s in specs]


def test_bad_updates_and_requests_change_nothing(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_server()
    a, b = RawSite(cluster.port, "site-a"), RawSite(cluster.port, "site-b")
    job = small_job(rounds=2, clients=2, epsilon=EPSILON) | {"clients": sorted(WEIGHTS)}
    job_id = cluster.submit(job)
    a.hello()
    b.hello()
    ta, tb = a.task(), b.task()
    man = Manifest.model_validate(ta["manifest"])
    seg = man.segment_bytes
    assert man.num_segments >= 2, "the model must span several segments"
    model = a.download(ta, tmp_path / "model.st")
    good_a = write_update(model, tmp_path / "good-a.st", man, _plus_epsilon)
    segments = list(file_segments(good_a, seg))
    tid = ta["task_id"]

    def snap() -> Any:
        return _fingerprint(cluster, job_id, {ta["task_id"]: a, tb["task_id"]: b})

    def bad_update(name: str, edit: Callable[[str, np.ndarray], np.ndarray], **kw: Any) -> Path:
        return write_update(model, tmp_path / f"{name}.st", man, edit, **kw)

    # --- one segment at a time ---------------------------------------------------------
    with _unchanged(snap):
        i, data, digest = segments[0]
        _refused(a.put_segment(tid, i, data, "0" * 16), 422, "integrity_error", "digest")
        _refused(a.put_segment(tid, 99, data, digest), 400, "bad_request", "outside")
        _refused(a.put_segment(tid, 0, data + b"x", digest), 413, "segment_too_long")
        _refused(
            a.put_segment(tid, 0, data + b"x" * 100_000, digest, chunked=True),
            413,
            "segment_too_long",
        )
        _refused(
            a.put_segment(tid, 0, data[:-1000], digest, chunked=True),
            400,
            "segment_truncated",
            "ended after",
        )
        a.put_cut_short(tid, 0, len(data), data[: len(data) // 2])
        _refused(a.request("PUT", f"/v1/tasks/{tid}/upload/0"), 400, "bad_request", "X-FL-Digest")

    for label, value in (("nan", np.nan), ("inf", np.inf)):

        def poison(name: str, x: np.ndarray, v: float = value) -> np.ndarray:
            y = _plus_epsilon(name, x).reshape(-1)
            if name == "layer00001":
                y[7] = v
            return y

        path = bad_update(label, poison)
        with _unchanged(snap):
            for i, data, digest in file_segments(path, seg):
                reply = a.put_segment(tid, i, data, digest)
                if reply.status != 200:
                    _refused(reply, 422, "update_rejected", "'layer00001'", "NaN or Inf")
                    break
            else:
                pytest.fail(f"the {label} update was accepted")

    # --- updates with the wrong tensors: refused at the segment holding the header -----
    wrong: dict[str, tuple[Layout, str]] = {
        "missing": (
            _layout_with(man, lambda s: _spec_tuples(s[:-1])),
            "missing tensor(s) ['layer00005']",
        ),
        "extra": (
            _layout_with(man, lambda s: [*_spec_tuples(s), ("zzz", "F32", s[0].shape)]),
            "unexpected tensor(s) ['zzz']",
        ),
        "dtype": (
            _layout_with(
                man,
                lambda s: [
                    (t.name, "F64" if i == 2 else t.dtype, t.shape) for i, t in enumerate(s)
                ],
            ),
            "'layer00002' has dtype F64, expected F32",
        ),
        "shape": (
            _layout_with(
                man,
                lambda s: [
                    (t.name, t.dtype, t.shape[::-1] if i == 3 else t.shape) for i, t in enumerate(s)
                ],
            ),
            "'layer00003' has shape",
        ),
    }
    for label, (layout, words) in wrong.items():

        def reshaped(name: str, x: np.ndarray, lay: Layout = layout) -> np.ndarray:
            spec = lay.tensor(name)
            return _plus_epsilon(name, x).reshape(-1)[: spec.numel].reshape(spec.shape)

        path = bad_update(label, reshaped, layout=layout)
        with _unchanged(snap):
            i, data, digest = next(file_segments(path, seg))
            _refused(a.put_segment(tid, i, data, digest), 422, "update_rejected", words)

    # --- a header that claims more bytes than the first segment holds: refused now, not
    # acknowledged, so the right first segment is then taken ---------------------------
    with _unchanged(snap):
        i, data, digest = segments[0]
        long_head = (seg * 4).to_bytes(8, "little") + data[8:]
        reply = a.put_segment(tid, i, long_head, segment_digest(long_head))
        _refused(reply, 422, "update_rejected", "header is", "bytes long")
    # --- commits ---------------------------------------------------------------------
    with _unchanged(snap):
        _refused(a.commit(tid, file_digest(good_a, seg)), 409, "conflict", "segments missing")
        commit_path = f"/v1/tasks/{tid}/commit"
        _refused(a.json("POST", commit_path, b"{not json"), 400, "bad_request", "not valid JSON")
        _refused(
            a.commit(tid, file_digest(good_a, seg), surprise=1), 400, "bad_request", "surprise"
        )
        _refused(
            a.json("POST", commit_path, {"digest": "x", "num_samples": 0}),
            400,
            "bad_request",
            "num_samples",
        )

    # --- someone else's task ------------------------------------------------------------
    with _unchanged(snap):
        other = tb["task_id"]
        i, data, digest = segments[0]
        _refused(a.put_segment(other, i, data, digest), 403, "forbidden", "another client")
        _refused(a.commit(other, "x"), 403, "forbidden")
        _refused(a.request("GET", tb["model_url"]), 403, "forbidden")
        _refused(a.request("GET", "/v1/clients/site-b/task"), 403, "forbidden")
        _refused(a.put_segment("0" * 16, i, data, digest), 404, "not_found")
        beyond = {"Range": f"bytes={man.file_size}-"}
        _refused(a.request("GET", ta["model_url"], headers=beyond), 416, "range_not_satisfiable")

    # --- the good update: every segment, then a commit with the wrong whole digest -----
    assert all(r.status == 200 for r in a.upload(tid, good_a, seg))
    with _unchanged(snap):
        _refused(a.commit(tid, "0" * 32), 422, "integrity_error", "digest")
    assert a.commit(tid, file_digest(good_a, seg), WEIGHTS["site-a"]).status == 200
    with _unchanged(snap):
        _refused(a.commit(tid, file_digest(good_a, seg)), 409, "conflict", "already committed")
        _refused(a.put_segment(tid, *segments[0][:2], segments[0][2]), 409, "conflict")

    # site-b: good on the first try; round 1 closes with both updates
    good_b = write_update(model, tmp_path / "good-b.st", man, _plus_epsilon)
    assert all(r.status == 200 for r in b.upload(tb["task_id"], good_b, seg))
    assert b.commit(tb["task_id"], file_digest(good_b, seg), WEIGHTS["site-b"]).status == 200
    cluster.wait_for(lambda: cluster.status(job_id)["job"]["round"] == 1, 30, "round 1 closed")

    # --- round 2: a late commit or segment for round 1 is told its task expired ---------
    ta2, tb2 = a.task(), b.task()
    assert ta2["round"] == 2
    with _unchanged(lambda: _fingerprint(cluster, job_id, {ta2["task_id"]: a, tb2["task_id"]: b})):
        _refused(a.commit(tid, file_digest(good_a, seg)), 409, "conflict", "committed")
    man2 = Manifest.model_validate(ta2["manifest"])
    for site, task in ((a, ta2), (b, tb2)):
        m = site.download(task, tmp_path / f"model2-{site.name}.st")
        up = write_update(m, tmp_path / f"up2-{site.name}.st", man2, _plus_epsilon)
        assert all(r.status == 200 for r in site.upload(task["task_id"], up, seg))
        digest = file_digest(up, seg)
        assert site.commit(task["task_id"], digest, WEIGHTS[site.name]).status == 200
    status = cluster.wait_job(job_id, timeout=60)
    assert status["job"]["state"] == "finished", cluster.logs()
    assert [r["num_updates"] for r in status["rounds"]] == [2, 2]
    assert_exact_model(cluster, job_id, 2, [WEIGHTS["site-a"], WEIGHTS["site-b"]], EPSILON)


def test_expired_task_is_told_so(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_server()
    a, b = RawSite(cluster.port, "site-a"), RawSite(cluster.port, "site-b")
    job_id = cluster.submit(small_job(rounds=2, clients=1, train_timeout=3.0))
    # site-b takes a task and never answers: after train_timeout it expires, and round 1
    # closes with site-a's update
    ta, tb = a.task(), b.task()
    man = Manifest.model_validate(ta["manifest"])
    model = a.download(ta, tmp_path / "m.st")
    up = write_update(model, tmp_path / "u.st", man, _plus_epsilon)
    assert all(r.status == 200 for r in a.upload(ta["task_id"], up, man.segment_bytes))
    assert a.commit(ta["task_id"], file_digest(up, man.segment_bytes)).status == 200
    cluster.wait_for(lambda: cluster.status(job_id)["job"]["round"] == 1, 30, "round 1 closed")
    i, data, digest = next(file_segments(up, man.segment_bytes))
    _refused(b.put_segment(tb["task_id"], i, data, digest), 410, "task_expired", "expired")
    _refused(b.commit(tb["task_id"], "x"), 410, "task_expired", "ask for a new task")
    assert b.task()["round"] == 2


def test_invalid_job_files_and_admin_requests_are_refused_by_name(cluster: Cluster) -> None:
    cluster.start_server()
    cases: list[tuple[Any, str]] = [
        ({"config": {**small_job(), "num_rounds": -1}}, "config.num_rounds"),
        ({"config": {**small_job(), "colour": "red"}}, "config.colour"),
        ({"config": {**small_job(), "min_clients": "two"}}, "config.min_clients"),
        ({"config": {**small_job(), "train_timeout": -5}}, "config.train_timeout"),
        ({"config": small_job(), "extra": 1}, "extra"),
        ({}, "config"),
    ]
    for body, field in cases:
        with pytest.raises(ApiError) as err:
            cluster.request("POST", "/v1/admin/jobs", body)
        assert err.value.status == 400, body
        assert err.value.body["field"] == field, err.value.body
        assert field.split(".")[-1] in err.value.body["message"]
    raw = RawSite(cluster.port, "admin")
    reply = raw.json("POST", "/v1/admin/jobs", b"{broken")
    _refused(reply, 400, "bad_request", "not valid JSON")
    _refused(raw.request("GET", "/v1/admin/jobs/nope"), 404, "not_found", "nope")
    _refused(raw.request("POST", "/v1/admin/jobs/nope/abort"), 404, "not_found")
    _refused(raw.request("GET", "/v1/admin/jobs/nope/model?round=x"), 404, "not_found")
    assert cluster.get("/v1/admin/jobs") == []


def test_out_of_range_numbers_and_nested_documents_are_4xx_naming_the_field(
    cluster: Cluster,
) -> None:
    cluster.start_server()
    huge_shape = {"kind": "generated", "num_tensors": 10, "tensor_shape": [2**62, 2**62]}
    cases: list[tuple[bytes, str]] = [
        # a train_timeout of 1e999 is infinity once parsed: no limit is null, never inf
        (b'{"config": ' + _job_json(train_timeout="1e999") + b"}", "config.train_timeout"),
        (b'{"config": ' + _job_json(model=huge_shape) + b"}", "config.model"),
        (b"[" * 5000 + b"]" * 5000, "body"),
        (b'{"config": {"name": ' + b'{"a": ' * 200 + b"1" + b"}" * 200 + b"}}", "body"),
    ]
    raw = RawSite(cluster.port, "admin")
    for body, field in cases:
        reply = raw.json("POST", "/v1/admin/jobs", body)
        assert reply.status == 400, (field, reply)
        assert reply.body["field"] == field, reply
    site = RawSite(cluster.port, "site-1")
    reply = site.json(
        "POST", "/v1/clients/site-1/heartbeat", {"bytes_done": 2**64, "bytes_total": 1}
    )
    assert reply.status == 400 and reply.body["field"] == "bytes_done", reply
    for wait in ("nan", "-1", "x" * 5000):
        reply = site.request("GET", f"/v1/clients/site-1/task?wait={wait}")
        assert reply.status == 400 and reply.body["field"] == "wait", (wait, reply)
    assert cluster.get("/v1/admin/jobs") == []


def _job_json(**fields: Any) -> bytes:
    """A valid job as JSON text, with ``fields`` put in as raw JSON (strings as given)."""

    job = small_job(rounds=1, clients=1)
    text = json.dumps({k: v for k, v in job.items() if k not in fields})[:-1]
    extra = ", ".join(
        f'"{k}": {v if isinstance(v, str) else json.dumps(v)}' for k, v in fields.items()
    )
    return f"{text}, {extra}}}".encode()
