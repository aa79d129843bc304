"""Trainer plugins for integration tests, named in job files as ``tests.plugins:<factory>``.

Client processes run with the repository root on ``PYTHONPATH``, so they import this
module like any site's own plugin package.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from common.config import MIB
from common.modelio import ModelReader, ModelWriter
from fl_client.trainer import AddEpsilon, TrainContext, TrainResult


class SlowAddEpsilon:
    """``add_epsilon`` that sleeps ``sleep_s`` before each tensor, reporting progress.

    Its updates are exactly those of the built-in trainer; it only takes longer, so a
    test can act on a client while it is training. With ``hold_file`` it also waits,
    before each tensor, for as long as that file exists, without reporting progress: a
    plugin deep in a long computation, which a test ends by removing the file. It reads
    each chunk before writing it, once, in order: ``in_place`` (a param) is true to it.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        self.epsilon = float(params.get("epsilon", 0.001))
        self.sleep_s = float(params.get("sleep_s", 0.5))
        self.in_place = bool(params.get("in_place", False))
        hold = params.get("hold_file")
        self.hold_file = Path(hold) if hold is not None else None

    def train(self, model: ModelReader, update: ModelWriter, ctx: TrainContext) -> TrainResult:
        for name in model.names:
            time.sleep(self.sleep_s)
            while self.hold_file is not None and self.hold_file.exists():
                time.sleep(0.05)
            for chunk in model.iter_chunks(name, 8 * MIB):
                np.add(chunk, chunk.dtype.type(self.epsilon), out=chunk)
                update.write(chunk, name=name)
                ctx.progress(chunk.nbytes)
        return TrainResult(num_samples=ctx.num_samples, metrics={"epsilon": self.epsilon})


class PoisonAt(SlowAddEpsilon):
    """``add_epsilon`` everywhere, except that site ``params['site']`` writes a NaN."""

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__({"sleep_s": 0.0, **params})
        self.site = str(params["site"])

    def train(self, model: ModelReader, update: ModelWriter, ctx: TrainContext) -> TrainResult:
        if ctx.site != self.site:
            return super().train(model, update, ctx)
        for i, name in enumerate(model.names):
            for j, chunk in enumerate(model.iter_chunks(name, 8 * MIB)):
                np.add(chunk, chunk.dtype.type(self.epsilon), out=chunk)
                if i == 0 and j == 0:
                    chunk[len(chunk) // 2] = np.nan
                update.write(chunk, name=name)
                ctx.progress(chunk.nbytes)
        return TrainResult(num_samples=ctx.num_samples, metrics={"epsilon": self.epsilon})


class CountRuns(SlowAddEpsilon):
    """``add_epsilon`` that appends ``<site> <task_id>`` to ``params['runs_file']`` as it
    starts training: a test reads how often each task was trained, across restarts."""

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__({"sleep_s": 0.0, **params})
        self.runs_file = Path(params["runs_file"])

    def train(self, model: ModelReader, update: ModelWriter, ctx: TrainContext) -> TrainResult:
        with open(self.runs_file, "a") as f:
            f.write(f"{ctx.site} {ctx.task_id}\n")
        return super().train(model, update, ctx)


class FailOnSite:
    """``add_epsilon``, except on site ``params['fail_site']``, where training raises."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.fail_site = str(params["fail_site"])
        self.inner = AddEpsilon({"epsilon": float(params.get("epsilon", 0.001))})

    def train(self, model: ModelReader, update: ModelWriter, ctx: TrainContext) -> TrainResult:
        if ctx.site == self.fail_site:
            raise RuntimeError(f"local data of {ctx.site} is unreadable")
        return self.inner.train(model, update, ctx)


class ChangeOnSite:
    """``add_epsilon``, except that site ``params['site']`` adds 1 to the first element
    of the integer tensor ``params['tensor']``, which updates must carry unchanged."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.site, self.tensor = str(params["site"]), str(params["tensor"])
        self.inner = AddEpsilon({"epsilon": float(params.get("epsilon", 0.001))})

    def train(self, model: ModelReader, update: ModelWriter, ctx: TrainContext) -> TrainResult:
        if ctx.site != self.site:
            return self.inner.train(model, update, ctx)
        for spec in model.layout.tensors:
            for first, chunk in enumerate(model.iter_chunks(spec.name, 8 * MIB)):
                if spec.averaged:
                    np.add(chunk, chunk.dtype.type(self.inner.params.epsilon), out=chunk)
                elif spec.name == self.tensor and first == 0:
                    chunk[0] += 1
                update.write(chunk, name=spec.name)
                ctx.progress(chunk.nbytes)
        return TrainResult(num_samples=ctx.num_samples)


def runs(runs_file: Path) -> list[tuple[str, str]]:
    """What ``CountRuns`` wrote: one ``(site, task_id)`` per training run."""
    if not runs_file.exists():
        return []
    return [
        (site, task) for site, task in (ln.split() for ln in runs_file.read_text().splitlines())
    ]


def count_runs(params: dict[str, Any]) -> CountRuns:
    return CountRuns(params)


def fail_on_site(params: dict[str, Any]) -> FailOnSite:
    return FailOnSite(params)


def slow_add_epsilon(params: dict[str, Any]) -> SlowAddEpsilon:
    return SlowAddEpsilon(params)


def poison_at(params: dict[str, Any]) -> PoisonAt:
    return PoisonAt(params)


def change_on_site(params: dict[str, Any]) -> ChangeOnSite:
    return ChangeOnSite(params)


def broken_factory(params: dict[str, Any]) -> SlowAddEpsilon:
    """A plugin whose set-up fails on every site: the factory raises before any training."""
    raise RuntimeError(f"licence server {params.get('licence_server', 'lic.invalid')} unreachable")


# every factory above: the test cluster's sites allow them (allowed_trainers)
PLUGINS = [
    f"tests.plugins:{name}"
    for name in (
        "count_runs",
        "fail_on_site",
        "slow_add_epsilon",
        "poison_at",
        "change_on_site",
        "broken_factory",
    )
]
