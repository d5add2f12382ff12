"""Serving many IncreLoRA task adapters on one frozen base model, mixed tasks in one batch.

    from serving import AdapterBank
    bank = AdapterBank.load("adapters/")
    bank.predict(["great film", ("a sentence", "its paraphrase")], tasks=["sst2", "mrpc"])
    bank.embed(["a query"], task="search"); bank.rerank("query", ["doc 1", "doc 2"], task="cross-encoder")

The package is in four levels, each importing only the ones below it: ops (the multi-adapter product),
layers (the multi-adapter modules and the per-batch context), bank (adapters, the registry, the bank)
and http (the service). CONTRIBUTING.md has the map.
"""
from increlora.errors import AdapterFormatError, BaseModelMismatchError, IncreLoraError

from .bank import (
    AdapterBank,
    AdapterShapeError,
    BankLoadError,
    DuplicateTaskError,
    InputError,
    NonFiniteOutputError,
    Prediction,
    ServingError,
    TaskAdapter,
    UnknownTaskError,
    WrongTaskKindError,
)
from .layers import BatchContext, MultiHead, MultiLoraLinear
from .ops import lora_segments, lora_segments_reference

__all__ = [
    "AdapterBank", "AdapterFormatError", "AdapterShapeError", "BankLoadError", "BaseModelMismatchError",
    "BatchContext", "DuplicateTaskError", "IncreLoraError", "InputError",
    "MultiHead", "MultiLoraLinear", "NonFiniteOutputError", "Prediction", "ServingError", "TaskAdapter",
    "UnknownTaskError", "WrongTaskKindError", "lora_segments", "lora_segments_reference",
]
