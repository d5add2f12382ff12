"""IncreLoRA: incremental parameter allocation for low-rank adaptation (Zhang et al., 2023)."""
from .adapter_file import Adapter, ModuleFactors, load_adapter, read_adapter, save_adapter
from .config import IncreLoraConfig
from .errors import (AdapterFormatError, BaseModelMismatchError, CheckpointError, ConfigError,
                     IncreLoraError, TargetModulesError)
from .fingerprint import model_fingerprint
from .layer import IncreLoraLinear
from .model import apply_increlora, increlora_layers, orth_loss, rank_pattern, trainable_parameter_count

__all__ = [
    "Adapter", "AdapterFormatError", "BaseModelMismatchError", "CheckpointError", "ConfigError",
    "IncreLoraConfig", "IncreLoraError", "IncreLoraLinear", "ModuleFactors", "TargetModulesError",
    "apply_increlora", "increlora_layers", "load_adapter", "model_fingerprint", "orth_loss",
    "rank_pattern", "read_adapter", "save_adapter", "trainable_parameter_count",
]
