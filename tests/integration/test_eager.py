"""A round averaged while its updates arrive: used when it counts exactly the committed
updates and weights, dropped otherwise; the model is numpy's either way.

Sites are driven request by request (``tests.rawclient``) so that each test decides
what is declared, uploaded and committed, and when.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.digest import segment_digest
from common.tensorfile import Manifest
from tests.cluster import Cluster, assert_exact_model, small_job, wait_log
from tests.rawclient import RawSite, file_digest, write_update

pytestmark = pytest.mark.integration

EPSILON = 0.001

# each site's driver, its task and its update file
Sites = dict[str, tuple[RawSite, dict[str, Any], Path]]


def _plus_epsilon(name: str, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x + x.dtype.type(EPSILON)).astype(x.dtype)
    return out


def _start(
    cluster: Cluster, tmp_path: Path, names: list[str], min_clients: int
) -> tuple[str, Sites, Manifest]:
    """A one-round job; each site has its task and its update (the model + epsilon)."""
    cluster.start_server()
    # 12 tensors of 302 KiB over 1 MiB segments: some tensors cross segment boundaries
    job = small_job(rounds=1, clients=min_clients, tensors=12, epsilon=EPSILON)
    job["clients"] = names
    job_id = cluster.submit(job)
    sites: Sites = {}
    man: Manifest | None = None
    raw = {name: RawSite(cluster.port, name) for name in names}
    for site in raw.values():
        site.hello()  # the round opens once enough sites are connected
    for name, site in raw.items():
        task = site.task()
        man = Manifest.model_validate(task["manifest"])
        model = site.download(task, tmp_path / f"{name}-model.st")
        update = write_update(model, tmp_path / f"{name}-update.st", man, _plus_epsilon)
        sites[name] = (site, task, update)
    assert man is not None and man.num_segments >= 3
    return job_id, sites, man


def _upload(sites: Sites, name: str, man: Manifest, declared: int | None) -> None:
    site, task, update = sites[name]
    replies = site.upload(task["task_id"], update, man.segment_bytes, num_samples=declared)
    assert all(r.status == 200 for r in replies), replies


def _commit(sites: Sites, name: str, man: Manifest, num_samples: int) -> None:
    site, task, update = sites[name]
    reply = site.commit(task["task_id"], file_digest(update, man.segment_bytes), num_samples)
    assert reply.status == 200, reply


@pytest.mark.parametrize(
    ("b_commits", "closed_how"),
    [
        (5, r"\(12 of 12 tensors while updates arrived\)"),  # as declared: used
        (3, r"\(from the spools\)"),  # not the 5 it declared: the commit decides
    ],
)
def test_the_round_is_averaged_before_it_closes_and_used_if_the_commits_agree(
    cluster: Cluster, tmp_path: Path, b_commits: int, closed_how: str
) -> None:
    job_id, sites, man = _start(cluster, tmp_path, ["site-a", "site-b"], min_clients=2)
    _upload(sites, "site-a", man, 2)
    _upload(sites, "site-b", man, 5)
    # both hold everything: the server averages every tensor before anyone commits
    wait_log(cluster, "server", r"round 1: all 12 tensors averaged while updates arrive")
    _commit(sites, "site-a", man, 2)
    _commit(sites, "site-b", man, b_commits)
    assert cluster.wait_job(job_id)["job"]["state"] == "finished"
    wait_log(cluster, "server", r"round 1 closed: 2 updates, .*" + closed_how)
    assert_exact_model(cluster, job_id, 1, [2, b_commits], EPSILON)


def test_a_site_that_drops_out_after_uploading_is_not_counted(
    cluster: Cluster, tmp_path: Path
) -> None:
    names = ["site-a", "site-b", "site-c"]
    job_id, sites, man = _start(cluster, tmp_path, names, min_clients=2)
    for name, weight in zip(names, (1, 2, 4), strict=True):
        _upload(sites, name, man, weight)
    wait_log(cluster, "server", r"round 1: all 12 tensors averaged while updates arrive")
    site_c, task_c, _ = sites["site-c"]
    reply = site_c.json("POST", f"/v1/tasks/{task_c['task_id']}/fail", {"reason": "gone"})
    assert reply.status == 200, reply
    _commit(sites, "site-a", man, 1)
    _commit(sites, "site-b", man, 2)
    assert cluster.wait_job(job_id)["job"]["state"] == "finished"
    # the early aggregate counted site-c: it is started over without it, or dropped
    wait_log(cluster, "server", r"round 1 closed: 2 updates, total weight 3")
    assert_exact_model(cluster, job_id, 1, [1, 2], EPSILON)


def test_a_malformed_declared_weight_is_refused_by_name(cluster: Cluster, tmp_path: Path) -> None:
    job_id, sites, man = _start(cluster, tmp_path, ["site-a", "site-b"], min_clients=2)
    site, task, update = sites["site-a"]
    data = update.read_bytes()[: man.segment_bytes]
    for value in ("0", "-3", "many", "1.5", "", "+5", "5_0", "9" * 5000):
        reply = site.put_segment(task["task_id"], 0, data, segment_digest(data), num_samples=value)
        assert reply.status == 400, (value, reply)
        assert reply.code == "bad_request" and "X-FL-Num-Samples" in reply.message, reply
    assert site.upload_status(task["task_id"]).body["segments_done"] == []
    # the same segment with a good weight is taken, and the job goes on to numpy's model
    _upload(sites, "site-a", man, 1)
    _upload(sites, "site-b", man, 1)
    _commit(sites, "site-a", man, 1)
    _commit(sites, "site-b", man, 1)
    assert cluster.wait_job(job_id)["job"]["state"] == "finished"
    assert_exact_model(cluster, job_id, 1, [1, 1], EPSILON)
