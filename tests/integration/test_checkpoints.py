"""Checkpoints as the safetensors library writes them go through a job and come back out
in their own layout: a 3-shard directory with its index, and a single file with
``{"format": "pt"}`` metadata (which sites used to fail on, over and over)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors
import safetensors.numpy

from common.checkpoint import INDEX_NAME, CheckpointLayout, write_checkpoint
from tests.cluster import ApiError, Cluster, fl_admin, small_job, tasks_of
from tests.expected import expected_after

pytestmark = pytest.mark.integration

EPSILON = 0.001
WEIGHTS = {"site-a": 2, "site-b": 3}
Arrays = dict[str, npt.NDArray[Any]]


def _shard_arrays(rng: np.random.Generator) -> dict[str, Arrays]:
    """f32 weights (more than a 1 MiB segment in all), an f16 tensor, int buffers."""
    return {
        "model-00001-of-00003.safetensors": {
            "embed.weight": rng.standard_normal((400, 257)).astype(np.float32),
            "layers.0.norm": rng.standard_normal(257).astype(np.float16),
        },
        "model-00002-of-00003.safetensors": {
            "layers.0.w": rng.standard_normal((300, 257)).astype(np.float32),
            "layers.0.steps": np.arange(12, dtype=np.int64).reshape(3, 4),
            "layers.0.b": rng.standard_normal(257).astype(np.float32),
        },
        "model-00003-of-00003.safetensors": {
            "lm_head.weight": rng.standard_normal((257, 300)).astype(np.float32),
            "lm_head.ids": np.arange(-5, 5, dtype=np.int32),
        },
    }


def _run(cluster: Cluster, path: str, rounds: int) -> str:
    cluster.start_server()
    for name, w in WEIGHTS.items():
        cluster.start_client(name, num_samples=w)
    job = small_job(rounds=rounds, clients=2, epsilon=EPSILON, model={"kind": "file", "path": path})
    job_id = cluster.submit(job)
    status = cluster.wait_job(job_id, timeout=180)
    assert status["job"]["state"] == "finished", cluster.logs()
    for site in WEIGHTS:
        for task in tasks_of(status, site):
            assert task["state"] == "committed", task
    return job_id


def _floats(arrays: Arrays) -> Arrays:
    return {n: a for n, a in arrays.items() if a.dtype.kind == "f"}


def test_a_three_shard_checkpoint_comes_back_in_its_own_layout(cluster: Cluster) -> None:
    source = cluster.root / "server" / "models" / "ckpt"
    source.mkdir(parents=True)
    shards = _shard_arrays(np.random.default_rng(5))
    for k, (file, arrays) in enumerate(shards.items()):
        safetensors.numpy.save_file(arrays, source / file, metadata={"format": "pt", "k": str(k)})
    weight_map = {t: f for f, arrays in shards.items() for t in sorted(arrays)}
    total = sum(a.nbytes for arrays in shards.values() for a in arrays.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (source / INDEX_NAME).write_text(json.dumps(index, indent=2))

    job_id = _run(cluster, "ckpt", rounds=2)
    layout = CheckpointLayout.model_validate(cluster.get(f"/v1/admin/jobs/{job_id}/checkpoint"))
    assert layout.is_sharded
    assert [s.file for s in layout.shards] == list(shards)

    internal = cluster.download(job_id, 2, cluster.root / "round-2.safetensors")
    out = cluster.root / "out"
    written = write_checkpoint(internal, layout, out, chunk_bytes=64 * 1024)
    assert written == [out / f for f in shards] + [out / INDEX_NAME]

    initial: Arrays = {n: a for arrays in shards.values() for n, a in arrays.items()}
    want = expected_after(_floats(initial), 2, list(WEIGHTS.values()), EPSILON)
    for file, arrays in shards.items():
        with (
            safetensors.safe_open(str(out / file), "np") as got,
            safetensors.safe_open(str(source / file), "np") as given,
        ):
            assert got.metadata() == given.metadata()
            assert got.offset_keys() == given.offset_keys()
            for name in got.offset_keys():
                x = got.get_tensor(name)
                assert x.dtype == arrays[name].dtype and x.shape == arrays[name].shape, name
                if name in want:
                    np.testing.assert_array_equal(x, want[name], err_msg=name)
    moved = want["embed.weight"]
    assert not np.array_equal(moved, initial["embed.weight"]), "the model did not move"
    assert json.loads((out / INDEX_NAME).read_text()) == index

    # fl-admin download writes the same files through the same layout
    by_cli = cluster.root / "by-cli"
    run = fl_admin("--server", cluster.url, "download", job_id, "--round", "2", "-o", str(by_cli))
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in by_cli.iterdir()) == sorted(p.name for p in out.iterdir())
    for p in out.iterdir():
        assert (by_cli / p.name).read_bytes() == p.read_bytes(), p.name

    with pytest.raises(ApiError) as err:
        cluster.get("/v1/admin/jobs/no-such-job/checkpoint")
    assert err.value.status == 404 and "no-such-job" in err.value.body["message"]


def test_a_single_file_with_pt_metadata_runs_and_keeps_its_metadata(cluster: Cluster) -> None:
    source = cluster.root / "server" / "models" / "model.safetensors"
    source.parent.mkdir(parents=True)
    rng = np.random.default_rng(9)
    arrays: Arrays = {
        "b": rng.standard_normal((300, 257)).astype(np.float32),
        "a": rng.standard_normal(1000).astype(np.float16),
    }
    safetensors.numpy.save_file(arrays, source, metadata={"format": "pt"})

    job_id = _run(cluster, "model.safetensors", rounds=1)
    layout = CheckpointLayout.model_validate(cluster.get(f"/v1/admin/jobs/{job_id}/checkpoint"))
    assert not layout.is_sharded
    internal = cluster.download(job_id, 1, cluster.root / "round-1.safetensors")
    out = cluster.root / "model.safetensors"
    write_checkpoint(internal, layout, out, chunk_bytes=1 << 20)
    want = expected_after(arrays, 1, list(WEIGHTS.values()), EPSILON)
    with (
        safetensors.safe_open(str(out), "np") as got,
        safetensors.safe_open(str(source), "np") as given,
    ):
        assert got.metadata() == {"format": "pt"}
        assert got.offset_keys() == given.offset_keys()
        for name, x in want.items():
            np.testing.assert_array_equal(got.get_tensor(name), x, err_msg=name)
