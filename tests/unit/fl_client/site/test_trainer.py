"""The built-in ``add_epsilon`` trainer on every kind of tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.modelio import ModelReader, ModelWriter
from common.tensorfile import numpy_dtype
from fl_client.site.trainer import AddEpsilon, TrainContext

SEGMENT = 4096
TENSORS = [
    ("bw", "BF16", (301,)),
    ("step", "I64", (3,)),
    ("mask", "BOOL", (5,)),
    ("w", "F32", (7,)),
    ("h", "F16", (4,)),
]


def test_add_epsilon_adds_in_the_float_type_and_copies_the_rest(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    values = {
        "bw": rng.standard_normal(301).astype(numpy_dtype("BF16")),
        "step": np.array([2**60 + 1, -7, 0], dtype=np.int64),
        "mask": np.array([True, False, False, True, False]),
        "w": rng.standard_normal(7).astype(np.float32),
        "h": rng.standard_normal(4).astype(np.float16),
    }
    with ModelWriter(tmp_path / "m.st", TENSORS, segment_bytes=SEGMENT) as w:
        for name, _, _ in TENSORS:
            w.write(values[name])
        w.finish()
    trainer = AddEpsilon({"epsilon": 0.25, "chunk_mib": 1})
    ctx = TrainContext("site-1", "job", "task", 1, 3, lambda n: None)
    with (
        ModelReader(tmp_path / "m.st") as model,
        ModelWriter(tmp_path / "u.st", model.layout, segment_bytes=SEGMENT) as update,
    ):
        trainer.train(model, update, ctx)
        update.finish()
    with ModelReader(tmp_path / "u.st") as got:
        for name, st, _ in TENSORS:
            x = values[name]
            if st in ("BF16", "F32", "F16"):
                want = x + x.dtype.type(0.25)  # numpy's add in the tensor's type
                assert got.read_tensor(name).dtype == x.dtype
            else:
                want = x
            assert got.read_tensor(name).tobytes() == want.tobytes(), name
