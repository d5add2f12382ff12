"""IncreLoRA: incremental parameter allocation for low-rank adaptation (Zhang et al., 2023)."""
from .adapter_file import Adapter, ModuleFactors, check_base_model, load_adapter, read_adapter, save_adapter
from .allocator import GrowthEvent, RankAllocator
from .assets import AssetError, resolve_model
from .checkpoint import load_checkpoint, save_checkpoint
from .config import IncreLoraConfig
from .errors import (AdapterFormatError, BaseModelMismatchError, CheckpointError, ConfigError,
                     IncreLoraError, TargetModulesError)
from .fingerprint import model_fingerprint
from .layer import IncreLoraLinear
from .model import apply_increlora, increlora_layers, orth_loss, rank_pattern, trainable_parameter_count
from .peft_interop import export_peft, import_peft
from .pretrained import load_model
from .schedule import RestartWarmupScheduler, restart_warmup_factor

__all__ = [
    "Adapter", "AdapterFormatError", "AssetError", "BaseModelMismatchError", "CheckpointError", "ConfigError",
    "GrowthEvent", "IncreLoraConfig", "IncreLoraError", "IncreLoraLinear", "ModuleFactors",
    "RankAllocator", "RestartWarmupScheduler", "TargetModulesError", "apply_increlora",
    "check_base_model", "export_peft", "import_peft", "increlora_layers", "load_adapter",
    "load_checkpoint", "load_model", "model_fingerprint", "orth_loss", "rank_pattern", "read_adapter",
    "resolve_model", "restart_warmup_factor", "save_adapter", "save_checkpoint", "trainable_parameter_count",
]
