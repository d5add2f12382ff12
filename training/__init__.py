"""Training IncreLoRA adapters (and LoRA / AdaLoRA baselines) with the Hugging Face Trainer.

Python: add ``IncreLoraCallback()`` to a Trainer whose model went through ``apply_increlora``, or use
``IncreLoraTrainer`` (restart-warmup schedule, exact resume). Command line: ``increlora-train``.
The names below are imported on first use, so that a process using ``training.data``, ``training.tasks``
or ``training.metrics`` alone (benchmarks that read the data sets) skips the Trainer's imports (seconds).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {"IncreLoraCallback": "callback", "METHODS": "methods", "TaskResult": "pipeline",
          "TrainOptions": "pipeline", "train_task": "pipeline", "IncreLoraTrainer": "trainer"}
__all__ = ["IncreLoraCallback", "IncreLoraTrainer", "METHODS", "TaskResult", "TrainOptions", "train_task"]

if TYPE_CHECKING:
    from .callback import IncreLoraCallback
    from .methods import METHODS
    from .pipeline import TaskResult, TrainOptions, train_task
    from .trainer import IncreLoraTrainer


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
