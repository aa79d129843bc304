"""The initial model, generated or copied, and long work stopped halfway without a trace."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from common.config import FileModel, GeneratedModel
from common.errors import Forbidden, ModelFormatError
from common.modelio import ModelReader, ModelWriter, compute_manifest, read_layout
from common.tensorfile import numpy_dtype
from fl_server.aggregate import Source, finalize, fold
from fl_server.modelgen import model_source, prepare_initial, tensor_shape
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
    man = prepare_initial(FileModel(path=source), out, SEGMENT, model_dirs=(tmp_path,))
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
        prepare_initial(spec, out, SEGMENT, _stopped_after(2), (tmp_path,))
    assert list(out.parent.iterdir()) == []


def test_aggregation_stops_between_chunks_and_leaves_nothing(tmp_path: Path) -> None:
    for name in ("u0", "u1"):
        prepare_initial(SPEC, tmp_path / f"{name}.st", SEGMENT)
    layout = read_layout(tmp_path / "u0.st")
    sources = [Source(tmp_path / "u0.st", 1.0), Source(tmp_path / "u1.st", 2.0)]
    with pytest.raises(Stopped):
        fold(sources, layout, tmp_path / "acc-2.f64", 4096, _stopped_after(3))
    with pytest.raises(Stopped):
        finalize(
            sources,
            layout,
            3.0,
            tmp_path / "round-1.st",
            SEGMENT,
            4096,
            _stopped_after(3),
            base=tmp_path / "u0.st",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u0.st", "u1.st"]


def test_a_model_file_is_taken_only_from_the_model_dirs(tmp_path: Path) -> None:
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    elsewhere.mkdir()
    secret = elsewhere / "secret.st"
    prepare_initial(SPEC, secret, SEGMENT)
    (models / "link.st").symlink_to(secret)
    (models / "sub").mkdir()
    prepare_initial(SPEC, models / "sub" / "ok.st", SEGMENT)
    dirs = (models,)
    assert model_source(FileModel(path=models / "sub" / "ok.st"), dirs) == models / "sub" / "ok.st"
    assert model_source(FileModel(path=Path("sub/ok.st")), dirs) == models / "sub" / "ok.st"
    for outside in (secret, models / "link.st", models / ".." / "elsewhere" / "secret.st"):
        with pytest.raises(Forbidden, match=r"model\.path: .* is not under the server's"):
            model_source(FileModel(path=outside), dirs)
    with pytest.raises(Forbidden):
        prepare_initial(FileModel(path=secret), tmp_path / "out.st", SEGMENT, model_dirs=dirs)
    assert not (tmp_path / "out.st").exists()


def test_a_file_that_is_no_model_is_refused_without_echoing_its_bytes(tmp_path: Path) -> None:
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n" * 10)
    with pytest.raises(ModelFormatError) as err:
        prepare_initial(FileModel(path=text), tmp_path / "out.st", SEGMENT, model_dirs=(tmp_path,))
    leaked = int.from_bytes(b"root:x:0", "little")
    assert "root" not in err.value.message and str(leaked) not in err.value.message


def test_a_bfloat16_model_is_generated_in_bf16(tmp_path: Path) -> None:
    spec = GeneratedModel(num_tensors=2, tensor_shape=[300, 7], dtype="bfloat16", seed=4)
    man = prepare_initial(spec, tmp_path / "m.st", SEGMENT)
    assert [t.dtype for t in man.layout.tensors] == ["BF16", "BF16"]
    with ModelReader(tmp_path / "m.st") as r:
        got = r.read_tensor("layer00001")
    # drawn in float32 and rounded to nearest even, as float16 models are
    want = np.random.default_rng([4, 1]).standard_normal(2100, dtype=np.float32)
    assert got.tobytes() == want.astype(numpy_dtype("BF16")).reshape(300, 7).tobytes()
    sized = GeneratedModel(num_tensors=1, tensor_mib=1, dtype="bfloat16")
    assert tensor_shape(sized) == (512 * 1024,)
