"""Serving many IncreLoRA task adapters on one frozen base model, mixed tasks in one batch.

    from serving import AdapterBank
    bank = AdapterBank.load("adapters/")
    bank.predict(["great film", ("a sentence", "its paraphrase")], tasks=["sst2", "mrpc"])
"""
from increlora.errors import AdapterFormatError, BaseModelMismatchError, IncreLoraError

from .adapter_bank import AdapterBank
from .batch_context import BatchContext
from .errors import (AdapterShapeError, BankLoadError, DuplicateTaskError, InputError, NonFiniteOutputError, ServingError,
                     UnknownTaskError)
from .lora_segments import lora_segments, lora_segments_reference
from .multi_head import MultiHead
from .multi_lora_linear import MultiLoraLinear
from .predictions import Prediction
from .task_adapter import TaskAdapter

__all__ = [
    "AdapterBank", "AdapterFormatError", "AdapterShapeError", "BankLoadError", "BaseModelMismatchError",
    "BatchContext", "DuplicateTaskError", "IncreLoraError", "InputError",
    "MultiHead", "MultiLoraLinear", "NonFiniteOutputError", "Prediction", "ServingError", "TaskAdapter", "UnknownTaskError",
    "lora_segments", "lora_segments_reference",
]
