"""``--log-format json``: every line is JSON, and lines about a task carry its ids."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster import Cluster, log_text, small_job

pytestmark = pytest.mark.integration

ROUNDS = 2
JSON_ARGS = ("--log-format", "json")
IDS = ("job", "round", "client", "task")


def json_lines(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(log_text(cluster, name).splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{name}.log line {n} is not JSON: {line!r}")
        assert isinstance(record, dict), line
        assert {"ts", "level", "role", "logger", "msg"} <= record.keys(), line
        out.append(record)
    return out


def test_json_logs_carry_job_round_client_and_task(cluster: Cluster) -> None:
    cluster.start_server(args=JSON_ARGS)
    for site in ("site-1", "site-2"):
        cluster.start_client(site, args=JSON_ARGS)
    job_id = cluster.submit(small_job(rounds=ROUNDS, tensors=4))
    status = cluster.wait_job(job_id)
    assert status["job"]["state"] == "finished", cluster.logs()
    cluster.stop_all()  # the shutdown lines are checked too

    tasks = {t["task_id"]: t for t in status["tasks"]}
    assert len(tasks) == 2 * ROUNDS
    logs = {name: json_lines(cluster, name) for name in ("server", "site-1", "site-2")}

    about_tasks = 0
    for name, records in logs.items():
        assert records, f"{name} logged nothing"
        for r in records:
            assert len(r["msg"]) < 2000, r  # sizes and ids only, never model data
            named = [t for t in tasks if t in r["msg"]]
            if not named:
                continue
            t = tasks[named[0]]
            about_tasks += 1
            want = {"job": job_id, "round": t["round"], "client": t["client"], "task": t["task_id"]}
            assert {k: r.get(k) for k in IDS} == want, (name, r)

    for site in ("site-1", "site-2"):
        records = logs[site]
        assert all(r["role"] == f"client {site}" and r.get("client") == site for r in records)
        transfer = [
            r for r in records if r["logger"] in ("fl_client.transfer", "fl_client.progress")
        ]
        finished = [r for r in transfer if " finished: " in r["msg"]]
        # download, training and upload of every round
        assert len(finished) == 3 * ROUNDS, transfer
        for r in transfer:
            assert all(k in r for k in IDS), r
            t = tasks[r["task"]]
            assert (r["job"], r["round"], r["client"]) == (job_id, t["round"], site), r

    commits = [r for r in logs["server"] if "committed" in r["msg"]]
    assert len(commits) == 2 * ROUNDS
    assert about_tasks > 4 * len(tasks)
