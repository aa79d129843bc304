"""The initial model, generated or copied, and long work stopped halfway without a trace."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from common.config import FileModel, GeneratedModel
from common.modelio import ModelWriter, compute_manifest, read_layout
from fl_server.aggregate import Source, finalize, fold
from fl_server.modelgen import prepare_initial
from fl_server.threads import Stopped

SEGMENT = 64 * 1024
SPEC = GeneratedModel(num_tensors=3, tensor_shape=[300, 257], seed=5)


def _stopped_after(calls: int) -> threading.Event:
    """An event that reads as set from its ``calls``-th check on (a caller cancelled)."""

    class After(threading.Event):
        seen = 0

        def is_set(self) -> bool:
            self.seen += 1
            return self.seen >= calls

    return After()


def test_a_file_model_is_copied_byte_for_byte_with_its_manifest(tmp_path: Path) -> None:
    source = tmp_path / "user.st"
    with ModelWriter(
        source, [("w", "F32", (1000, 37)), ("b", "F16", (37,))], segment_bytes=SEGMENT
    ) as w:
        w.write(np.arange(37000, dtype=np.float32))
        w.write(np.ones(37, dtype=np.float16))
        w.finish()
    out = tmp_path / "models" / "round-0.safetensors"
    man = prepare_initial(FileModel(path=source), out, SEGMENT)
    assert out.read_bytes() == source.read_bytes()
    assert man == compute_manifest(out, SEGMENT)
    assert not out.with_name(out.name + ".part").exists()


@pytest.mark.parametrize("kind", ["generated", "file"])
def test_preparing_the_initial_model_stops_between_chunks_and_leaves_nothing(
    tmp_path: Path, kind: str
) -> None:
    source = tmp_path / "user.st"
    # 12 MiB: more than one chunk of the copy
    prepare_initial(GeneratedModel(num_tensors=3, tensor_shape=[1024, 1024]), source, SEGMENT)
    spec = SPEC if kind == "generated" else FileModel(path=source)
    out = tmp_path / "models" / "round-0.safetensors"
    with pytest.raises(Stopped):
        prepare_initial(spec, out, SEGMENT, _stopped_after(2))
    assert list(out.parent.iterdir()) == []


def test_aggregation_stops_between_chunks_and_leaves_nothing(tmp_path: Path) -> None:
    for name in ("u0", "u1"):
        prepare_initial(SPEC, tmp_path / f"{name}.st", SEGMENT)
    layout = read_layout(tmp_path / "u0.st")
    sources = [Source(tmp_path / "u0.st", 1.0), Source(tmp_path / "u1.st", 2.0)]
    with pytest.raises(Stopped):
        fold(sources, layout, tmp_path / "acc-2.f64", 4096, _stopped_after(3))
    with pytest.raises(Stopped):
        finalize(sources, layout, 3.0, tmp_path / "round-1.st", SEGMENT, 4096, _stopped_after(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u0.st", "u1.st"]
