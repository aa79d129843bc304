"""A bf16 model with integer and bool buffers through real processes, checked bit for bit.

The model is a file under the server's ``models/``: bfloat16 and float32 weights, an
int64 step counter past 2**53 (float64 would round it) lying across the first segment
boundary, and a bool mask. Float tensors must come out as numpy's weighted average
rounded to nearest even (``tests.expected``); the others exactly as they went in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.modelio import ModelReader, ModelWriter
from common.tensorfile import numpy_dtype
from tests.cluster import Cluster, small_job
from tests.expected import Model, expected_after

pytestmark = pytest.mark.integration

TENSORS = [
    ("embed", "BF16", (512, 1022)),  # 1,046,528 bytes: the next tensor crosses 1 MiB
    ("steps", "I64", (1000,)),
    ("norm", "BF16", (1022,)),
    ("mask", "BOOL", (13,)),
    ("head", "F32", (1022, 3)),
]


def _write_model(path: Path) -> None:
    rng = np.random.default_rng(9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with ModelWriter(path, TENSORS, segment_bytes=1 << 20) as w:
        for _, st, shape in TENSORS:
            if st == "I64":
                w.write(2**60 + np.arange(shape[0], dtype=np.int64) * 3)
            elif st == "BOOL":
                w.write(rng.integers(0, 2, shape).astype(np.bool_))
            else:
                w.write((rng.standard_normal(shape) * 4).astype(numpy_dtype(st)))
        man = w.finish()
    steps = man.layout.tensor("steps")
    assert man.layout.data_offset + steps.begin < 1 << 20 < man.layout.data_offset + steps.end


def _read(path: Path) -> Model:
    with ModelReader(path) as r:
        return {name: r.read_tensor(name) for name in r.names}


def _run(cluster: Cluster, rounds: int, clients: int, trainer: dict[str, Any]) -> dict[str, Any]:
    _write_model(cluster.root / "server" / "models" / "init.safetensors")
    cluster.start_server()
    cluster.start_client("site-1", num_samples=1)
    cluster.start_client("site-2", num_samples=3)
    cluster.wait_clients("site-1", "site-2")
    job = small_job(
        rounds=rounds,
        clients=clients,
        model={"kind": "file", "path": "init.safetensors"},
        trainer=trainer,
    )
    job_id = cluster.submit(job)
    status = cluster.wait_job(job_id, timeout=120)
    assert status["job"]["state"] == "finished", cluster.logs()
    return status


def _check(cluster: Cluster, job_id: str, rounds: int, weights: list[int]) -> None:
    initial = _read(cluster.download(job_id, 0, cluster.root / "initial.st"))
    final = _read(cluster.download(job_id, rounds, cluster.root / "final.st"))
    want = expected_after(initial, rounds, weights, 0.001)
    assert sorted(final) == sorted(want)
    for name, w in want.items():
        assert final[name].dtype == w.dtype and final[name].shape == w.shape, name
        assert final[name].tobytes() == w.tobytes(), name
    assert final["embed"].dtype == numpy_dtype("BF16")  # a bf16 model stays bf16
    assert not np.array_equal(final["embed"], initial["embed"]), "the model did not move"
    assert final["steps"].tobytes() == initial["steps"].tobytes()


def test_a_bf16_model_with_integer_buffers_is_averaged_exactly(cluster: Cluster) -> None:
    status = _run(cluster, 2, 2, {"name": "add_epsilon", "params": {"epsilon": 0.001}})
    assert [r["num_updates"] for r in status["rounds"]] == [2, 2]
    _check(cluster, status["job"]["job_id"], 2, [1, 3])


def test_an_update_that_changes_an_integer_tensor_is_rejected_naming_it(
    cluster: Cluster,
) -> None:
    trainer = {
        "name": "tests.plugins:change_on_site",
        "params": {"site": "site-2", "tensor": "steps", "epsilon": 0.001},
    }
    status = _run(cluster, 1, 1, trainer)
    rejected = [t for t in status["tasks"] if t["state"] == "rejected"]
    assert rejected and all(t["client"] == "site-2" for t in rejected), status["tasks"]
    reason = rejected[0]["reason"]
    assert "tensor 'steps' differs from the round's global model (first at element 0)" in reason
    committed = [t for t in status["tasks"] if t["state"] == "committed"]
    assert {t["client"] for t in committed} == {"site-1"}
    _check(cluster, status["job"]["job_id"], 1, [1])
