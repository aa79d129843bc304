"""The trainer plugin API, at the import path plugins use: see ``fl_client.site.trainer``."""

from fl_client.site.trainer import (
    AddEpsilon,
    TrainContext,
    Trainer,
    TrainerFailed,
    TrainResult,
    load_trainer,
)

__all__ = ["AddEpsilon", "TrainContext", "TrainResult", "Trainer", "TrainerFailed", "load_trainer"]
