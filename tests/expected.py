"""numpy's own computation of what a job must produce, for checking results exactly.

Float tensors: every client adds epsilon in the tensor's type, the server takes the
weighted average in float64 and rounds it to nearest even into that type (16-bit floats
through the integer reference of ``tests.rounding``, not a cast). Integer and bool
tensors are carried: every round's model holds the initial model's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from common.tensorfile import FLOAT_DTYPES, st_dtype
from tests.rounding import BF16, F16, Format, round_array

Model = dict[str, npt.NDArray[Any]]

_REFERENCE: dict[str, Format] = {"BF16": BF16, "F16": F16}


def add_epsilon_round(model: Model, weights: list[int], epsilon: float) -> Model:
    """One round: every client adds epsilon, the server takes numpy's weighted average."""
    out: Model = {}
    for name, x in model.items():
        st = st_dtype(x.dtype)
        if st not in FLOAT_DTYPES:
            out[name] = x
            continue
        updates = [(x + x.dtype.type(epsilon)).astype(x.dtype) for _ in weights]
        avg = np.average(
            np.stack([u.astype(np.float64) for u in updates]),
            axis=0,
            weights=np.asarray(weights, dtype=np.float64),
        )
        fmt = _REFERENCE.get(st)
        out[name] = avg.astype(x.dtype) if fmt is None else round_array(avg, fmt).view(x.dtype)
    return out


def expected_after(initial: Model, rounds: int, weights: list[int], epsilon: float) -> Model:
    model = initial
    for _ in range(rounds):
        model = add_epsilon_round(model, weights, epsilon)
    return model
