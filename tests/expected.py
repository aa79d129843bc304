"""numpy's own computation of what a job must produce, for checking results exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

# the models of these tests are floating point: adding epsilon needs a float dtype
Model = dict[str, npt.NDArray[np.floating[Any]]]


def add_epsilon_round(model: Model, weights: list[int], epsilon: float) -> Model:
    """One round: every client adds epsilon, the server takes numpy's weighted average."""
    out: Model = {}
    for name, x in model.items():
        updates = [(x + x.dtype.type(epsilon)).astype(x.dtype) for _ in weights]
        avg = np.average(
            np.stack([u.astype(np.float64) for u in updates]),
            axis=0,
            weights=np.asarray(weights, dtype=np.float64),
        )
        out[name] = avg.astype(x.dtype)
    return out


def expected_after(initial: Model, rounds: int, weights: list[int], epsilon: float) -> Model:
    model = initial
    for _ in range(rounds):
        model = add_epsilon_round(model, weights, epsilon)
    return model
