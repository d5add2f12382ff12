"""Adapters and the registry: reading adapter folders, checking them against the base model, the
immutable task registry, the AdapterBank that wraps the base model's modules and answers predict
(embed, rerank) for tasks of every kind (kinds/), and the same bank in a child process (ProcessBank).
Uses layers and ops; knows nothing of HTTP.
"""
from .adapter_bank import AdapterBank
from .errors import (
    AdapterShapeError,
    BankLoadError,
    DuplicateTaskError,
    InputError,
    NonFiniteOutputError,
    ServingError,
    UnknownTaskError,
    WorkerDiedError,
    WrongTaskKindError,
)
from .predictions import Prediction
from .process_bank import ProcessBank
from .task_adapter import TaskAdapter

__all__ = ["AdapterBank", "AdapterShapeError", "BankLoadError", "DuplicateTaskError", "InputError",
           "NonFiniteOutputError", "Prediction", "ProcessBank", "ServingError", "TaskAdapter", "UnknownTaskError",
           "WorkerDiedError", "WrongTaskKindError"]
