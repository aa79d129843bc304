"""Checkpoints in, one internal file, checkpoints out: single files and shard directories
as the safetensors library writes them come back as they went in."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors
import safetensors.numpy

from common.checkpoint import (
    INDEX_NAME,
    CheckpointLayout,
    IndexLayout,
    ShardLayout,
    check_file_name,
    write_checkpoint,
)
from common.config import FileModel, GeneratedModel
from common.errors import ConfigError, Forbidden, ModelFormatError
from common.modelio import compute_manifest, read_header
from common.tensorfile import plan_layout
from fl_server.modelgen import prepare_initial

SEGMENT = 4096
Arrays = dict[str, npt.NDArray[Any]]


def _arrays(seed: int, names: list[str]) -> Arrays:
    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for i, name in enumerate(names):
        kind = i % 3
        if kind == 0:
            out[name] = rng.standard_normal((17, 5)).astype(np.float32)
        elif kind == 1:
            out[name] = rng.standard_normal(33).astype(np.float16)
        else:
            out[name] = rng.integers(-9, 9, size=(3, 4)).astype(np.int64)
    return out


def _shards(directory: Path, index_meta: dict[str, Any] | None = None) -> dict[str, Arrays]:
    """Three shards and their index, as transformers' save_pretrained lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    names = {
        "model-00001-of-00003.safetensors": ["embed.weight", "layers.0.w", "layers.0.b"],
        "model-00002-of-00003.safetensors": ["layers.1.w", "layers.1.b", "layers.1.steps"],
        "model-00003-of-00003.safetensors": ["norm.weight", "lm_head.weight"],
    }
    shards = {f: _arrays(k, n) for k, (f, n) in enumerate(names.items())}
    for k, (f, arrays) in enumerate(shards.items()):
        safetensors.numpy.save_file(arrays, directory / f, metadata={"format": "pt", "k": str(k)})
    weight_map = {t: f for f, arrays in shards.items() for t in arrays}
    index: dict[str, Any] = {"weight_map": dict(sorted(weight_map.items()))}
    if index_meta is not None:
        index["metadata"] = index_meta
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return shards


def _assert_same_file(got: Path, want: Path) -> None:
    with safetensors.safe_open(str(got), "np") as g, safetensors.safe_open(str(want), "np") as w:
        assert g.metadata() == w.metadata()
        assert g.offset_keys() == w.offset_keys()
    loaded, expected = safetensors.numpy.load_file(got), safetensors.numpy.load_file(want)
    assert list(loaded) == list(expected)
    for name, x in expected.items():
        assert loaded[name].dtype == x.dtype, name
        np.testing.assert_array_equal(loaded[name], x, err_msg=name)


def _prepare(tmp_path: Path, path: Path) -> tuple[Path, CheckpointLayout]:
    model, ckpt = tmp_path / "job" / "round-0.safetensors", tmp_path / "job" / "checkpoint.json"
    man = prepare_initial(FileModel(path=path), model, SEGMENT, None, (tmp_path / "models",), ckpt)
    assert man == compute_manifest(model, SEGMENT)
    return model, CheckpointLayout.model_validate_json(ckpt.read_text())


def test_a_library_file_with_metadata_goes_in_canonical_and_comes_out_the_same(
    tmp_path: Path,
) -> None:
    source = tmp_path / "models" / "model.safetensors"
    source.parent.mkdir()
    arrays = _arrays(3, ["zeta", "alpha", "mid", "beta"])
    safetensors.numpy.save_file(arrays, source, metadata={"format": "pt"})
    model, layout = _prepare(tmp_path, source)

    # inside: the server's own header, the user's metadata in it, tensors in data order
    header = read_header(model)
    order = [t.name for t in read_header(source).layout.tensors]
    assert [t.name for t in header.layout.tensors] == order
    assert header.metadata == {"format": "pt"}
    _, head = plan_layout(
        [(t.name, t.dtype, t.shape) for t in header.layout.tensors], {"format": "pt"}
    )
    assert model.read_bytes()[: len(head)] == head
    assert not layout.is_sharded
    assert layout.shards == (
        ShardLayout(file="model.safetensors", tensors=tuple(order), metadata={"format": "pt"}),
    )

    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    assert write_checkpoint(model, layout, out, chunk_bytes=7) == [out]
    _assert_same_file(out, source)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]


def test_a_three_shard_directory_is_joined_in_name_order_and_written_back_shard_by_shard(
    tmp_path: Path,
) -> None:
    source = tmp_path / "models" / "ckpt"
    shards = _shards(source, index_meta={"total_size": 1, "total_parameters": 77})
    model, layout = _prepare(tmp_path, source)

    assert layout.is_sharded
    assert layout.index == IndexLayout(
        file=INDEX_NAME, metadata={"total_size": 1, "total_parameters": 77}
    )
    assert [s.file for s in layout.shards] == sorted(shards)
    header = read_header(model)
    order = [t.name for f in sorted(shards) for t in read_header(source / f).layout.tensors]
    assert [t.name for t in header.layout.tensors] == order
    assert header.metadata is None  # the shards' metadata differ ("k"): each keeps its own

    out = tmp_path / "out"
    written = write_checkpoint(model, layout, out, chunk_bytes=64)
    assert written == [out / f for f in sorted(shards)] + [out / INDEX_NAME]
    for f in shards:
        _assert_same_file(out / f, source / f)
    index = json.loads((out / INDEX_NAME).read_text())
    want = json.loads((source / INDEX_NAME).read_text())
    assert index["weight_map"] == want["weight_map"]
    total = sum(a.nbytes for arrays in shards.values() for a in arrays.values())
    assert index["metadata"] == {"total_size": total, "total_parameters": 77}  # recomputed
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, INDEX_NAME])


def test_shards_that_share_their_metadata_keep_it_in_the_internal_file(tmp_path: Path) -> None:
    source = tmp_path / "models" / "ckpt"
    source.mkdir(parents=True)
    weight_map = {}
    for k in range(2):
        f = f"part-{k}.safetensors"
        safetensors.numpy.save_file(_arrays(k, [f"t{k}"]), source / f, metadata={"format": "pt"})
        weight_map[f"t{k}"] = f
    (source / "weights.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, layout = _prepare(tmp_path, source / "weights.safetensors.index.json")
    assert read_header(model).metadata == {"format": "pt"}
    assert layout.index == IndexLayout(file="weights.safetensors.index.json", metadata=None)
    write_checkpoint(model, layout, tmp_path / "out", chunk_bytes=1 << 20)
    assert "metadata" not in json.loads(
        (tmp_path / "out" / "weights.safetensors.index.json").read_text()
    )


@pytest.mark.parametrize("name", ["../evil.safetensors", "sub/x.safetensors", "/etc/x", "..", ""])
def test_shard_names_that_are_not_plain_file_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelFormatError, match="is not a plain file name"):
        check_file_name(name)
    # in an index on the server
    source = tmp_path / "models" / "ckpt"
    _shards(source)
    index = json.loads((source / INDEX_NAME).read_text())
    index["weight_map"]["norm.weight"] = name
    (source / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match=f"{name!r} is not a plain file name") as err:
        _prepare(tmp_path, source)
    assert "norm.weight" in str(err.value)
    # in a description that came over the network
    body: dict[str, object] = {
        "shards": [{"file": "a.safetensors", "tensors": ["x"]}, {"file": name, "tensors": ["y"]}],
        "index": {"file": INDEX_NAME},
    }
    with pytest.raises(ModelFormatError, match="is not a plain file name"):
        CheckpointLayout.model_validate_json(json.dumps(body))
    # and in one made without validation, before anything is written
    bad = CheckpointLayout.model_construct(
        shards=(ShardLayout.model_construct(file=name, tensors=("x",), metadata=None),), index=None
    )
    out = tmp_path / "out"
    with pytest.raises(ModelFormatError, match="is not a plain file name"):
        write_checkpoint(tmp_path / "missing", bad, out, 1024)
    assert not out.exists()


def test_a_shard_linked_from_outside_the_model_dirs_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "models" / "ckpt"
    shards = _shards(source)
    elsewhere = tmp_path / "elsewhere.safetensors"
    first = sorted(shards)[0]
    (source / first).rename(elsewhere)
    (source / first).symlink_to(elsewhere)
    with pytest.raises(Forbidden, match=f"shard {first!r} .* outside the server's model_dirs"):
        _prepare(tmp_path, source)
    assert not (tmp_path / "job" / "round-0.safetensors").exists()


def test_an_index_that_disagrees_with_its_shards_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "models" / "ckpt"
    _shards(source)
    index = json.loads((source / INDEX_NAME).read_text())
    index["weight_map"]["norm.weight"] = "model-00001-of-00003.safetensors"
    (source / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match=r"'norm\.weight' is listed in 'model-00001"):
        _prepare(tmp_path, source)
    index["weight_map"]["missing"] = "model-00004-of-00003.safetensors"
    (source / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(
        ConfigError, match=r"'model-00004-of-00003\.safetensors', named by the index"
    ):
        _prepare(tmp_path, source)


def test_a_directory_without_one_index_is_refused_naming_what_it_holds(tmp_path: Path) -> None:
    source = tmp_path / "models" / "ckpt"
    source.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"must hold one shard index .* it holds none"):
        _prepare(tmp_path, source)


def test_a_generated_model_is_described_as_one_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint.json"
    spec = GeneratedModel(num_tensors=2, tensor_shape=[4, 4])
    prepare_initial(spec, tmp_path / "m.st", SEGMENT, checkpoint=ckpt)
    layout = CheckpointLayout.model_validate_json(ckpt.read_text())
    assert layout.shards == (
        ShardLayout(file="model.safetensors", tensors=("layer00000", "layer00001")),
    )
    write_checkpoint(tmp_path / "m.st", layout, tmp_path / "out.safetensors", 10)
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "m.st").read_bytes()


def test_a_model_that_is_not_the_checkpoints_leaves_no_file(tmp_path: Path) -> None:
    model = tmp_path / "m.st"
    prepare_initial(GeneratedModel(num_tensors=2, tensor_shape=[4]), model, SEGMENT)
    layout = CheckpointLayout(
        shards=(
            ShardLayout(file="a.safetensors", tensors=("layer00000",)),
            ShardLayout(file="b.safetensors", tensors=("other",)),
        ),
        index=IndexLayout(),
    )
    with pytest.raises(ModelFormatError, match=r"missing \['other'\]"):
        write_checkpoint(model, layout, tmp_path / "out", 16)
    assert not (tmp_path / "out").exists()


def test_a_write_that_fails_halfway_leaves_no_half_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "models" / "ckpt"
    shards = _shards(source)
    model, layout = _prepare(tmp_path, source)
    calls = 0
    real = os.preadv

    def failing(fd: int, bufs: list[memoryview], pos: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 12:  # in the second shard: the first took 10 chunks
            raise OSError(28, "No space left on device")
        return real(fd, bufs, pos)

    monkeypatch.setattr(os, "preadv", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space"):
        write_checkpoint(model, layout, out, chunk_bytes=64)
    left = sorted(p.name for p in out.iterdir())
    assert left and all(n in shards for n in left)  # whole shards only, no .part
    for n in left:
        _assert_same_file(out / n, source / n)
