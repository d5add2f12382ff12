"""Training IncreLoRA adapters (and LoRA / AdaLoRA baselines) with the Hugging Face Trainer.

Python: add ``IncreLoraCallback()`` to a Trainer whose model went through ``apply_increlora``, or use
``IncreLoraTrainer`` (restart-warmup schedule, exact resume). Command line: ``increlora-train``.
"""
from .callback import IncreLoraCallback
from .methods import METHODS
from .pipeline import TaskResult, TrainOptions, train_task
from .trainer import IncreLoraTrainer

__all__ = ["IncreLoraCallback", "IncreLoraTrainer", "METHODS", "TaskResult", "TrainOptions", "train_task"]
