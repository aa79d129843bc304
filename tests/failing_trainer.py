"""A trainer plugin for tests: add_epsilon, except on the site named in ``fail_site``."""

from __future__ import annotations

from typing import Any

from common.modelio import ModelReader, ModelWriter
from fl_client.trainer import AddEpsilon, TrainContext, TrainResult


class FailOnSite:
    def __init__(self, params: dict[str, Any]) -> None:
        self.fail_site = str(params["fail_site"])
        self.inner = AddEpsilon({"epsilon": float(params.get("epsilon", 0.001))})

    def train(self, model: ModelReader, update: ModelWriter, ctx: TrainContext) -> TrainResult:
        if ctx.site == self.fail_site:
            raise RuntimeError(f"local data of {ctx.site} is unreadable")
        return self.inner.train(model, update, ctx)


def factory(params: dict[str, Any]) -> FailOnSite:
    return FailOnSite(params)
