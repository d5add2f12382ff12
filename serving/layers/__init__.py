"""Multi-adapter modules: each wraps one module of the frozen base and applies every task of a batch to
its own rows, reading the per-batch context (rows sorted by task, each module's work list) that the bank
sets once per forward. Uses ops; knows nothing of adapter files or the registry.
"""
from .batch_context import BatchContext, current_batch, using_batch
from .multi_head import MultiHead
from .multi_lora_linear import MultiLoraLinear

__all__ = ["BatchContext", "MultiHead", "MultiLoraLinear", "current_batch", "using_batch"]
