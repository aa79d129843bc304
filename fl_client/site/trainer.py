"""Trainers: the built-in ``add_epsilon`` and the interface plugins implement.

A trainer runs in a worker thread. It gets a read-only, chunked view of the global
model (``ModelReader``) and writes its update through a streaming ``ModelWriter`` laid
out exactly like the model (same tensors, dtypes, shapes, order), tensor after tensor.
It may load whole tensors if it wants; the framework never does. It should call
``ctx.progress(nbytes)`` as it goes: the server counts that as progress on the task, so
``train_timeout`` only drops a trainer that has stopped moving.

A plugin is named ``package.module:factory`` in the job file; ``factory(params)`` must
return an object with ``train(model, update, ctx) -> TrainResult``. A site runs only
the plugins its own config lists in ``allowed_trainers``: whoever submits a job does
not decide what code runs on another organisation's machine. A plugin not listed is
refused before its module is imported.

A trainer whose every read of the model comes before its write of the same bytes of the
update, and that never reads back a part of the model it has written the update for
(one pass, tensor by tensor, chunk by chunk, as ``add_epsilon`` does), may set
``in_place = True``: the update is then written over the downloaded model instead of
into a second file. That spares a site a model-size file on disk and most of the cost of
writing the update; a trainer stopped halfway then downloads the model again.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from common.config import BUILTIN_TRAINER, MIB, AddEpsilonParams, TrainerSpec
from common.errors import FLError
from common.modelio import ModelReader, ModelWriter
from common.outcomes import Outcome, decided
from common.tensorfile import element_window


@decided(Outcome.GIVE_UP)  # the same trainer fails the same way: tell the server
class TrainerFailed(FLError):
    """The trainer plugin raised or returned something unusable; the site reports it."""

    code = "trainer_failed"


@dataclass(frozen=True)
class TrainContext:
    site: str
    job_id: str
    task_id: str
    round: int
    num_samples: int
    progress: Callable[[int], None]


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    def train(self, model: ModelReader, update: ModelWriter, ctx: TrainContext) -> TrainResult: ...


class AddEpsilon:
    """Adds ``epsilon`` to every float element, chunk by chunk, in the tensor's own type:
    the stand-in for local training. Integer and bool tensors are copied unchanged: the
    server does not average them and refuses an update that changes them.
    """

    in_place = True  # each chunk is read, then written back to where it came from

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = AddEpsilonParams.model_validate(params)

    def train(self, model: ModelReader, update: ModelWriter, ctx: TrainContext) -> TrainResult:
        # one buffer for the whole model, read into and written from chunk after chunk:
        # the memory this takes is chunk_mib, however many tensors go through it
        raw = np.empty(self.params.chunk_mib * MIB, dtype=np.uint8)
        for spec in model.layout.tensors:
            step = element_window(spec, raw.nbytes)
            buf = raw[: step * spec.np_dtype.itemsize].view(spec.np_dtype)
            epsilon = spec.np_dtype.type(self.params.epsilon)
            for first in range(0, spec.numel, step):
                chunk = buf[: min(step, spec.numel - first)]
                model.read_into(spec, first, chunk)
                if spec.averaged:
                    np.add(chunk, epsilon, out=chunk)
                update.write(chunk, name=spec.name)
                ctx.progress(chunk.nbytes)
        return TrainResult(num_samples=ctx.num_samples, metrics={"epsilon": self.params.epsilon})


def load_trainer(spec: TrainerSpec, allowed: Collection[str] = ()) -> Trainer:
    """The trainer the task names; any failure to get one is this site's ``TrainerFailed``.

    ``allowed`` is the site's ``allowed_trainers``: a plugin not in it is refused and
    nothing is imported.

    A plugin that cannot be imported (missing, or raising at import), a factory that
    raises, and a factory returning something without ``train()`` all fail the task on
    this site only: the daemon reports it to the server, which goes on with the other
    sites or fails the round by quorum. None of them is fixed by trying again.
    """
    name = spec.name
    try:
        if name == BUILTIN_TRAINER:
            return AddEpsilon(spec.params)
        if name not in allowed:
            raise TrainerFailed(
                f"trainer {name!r} is not allowed on this site: its allowed_trainers lists "
                f"{', '.join(sorted(allowed)) or 'no plugin'}; the site's operator decides "
                "which code runs there (add it to allowed_trainers in the site's config)",
                field="trainer.name",
            )
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise TrainerFailed(
                f"trainer {name!r} cannot be loaded on this site: {exc}", field="trainer.name"
            ) from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise TrainerFailed(
                f"trainer {name!r} cannot be loaded on this site: module {module_name!r} "
                f"has no callable {attr!r}",
                field="trainer.name",
            )
        trainer = factory(spec.params)
    except TrainerFailed:
        raise
    except Exception as exc:
        raise TrainerFailed(f"trainer {name!r} could not be set up: {exc!r}") from exc
    if not callable(getattr(trainer, "train", None)):
        raise TrainerFailed(f"trainer {name!r}: its factory returned {trainer!r}, without train()")
    return trainer  # type: ignore[no-any-return]
