"""IncreLoRA: incremental parameter allocation for low-rank adaptation (Zhang et al., 2023).

The pinned-asset downloader behind the embedded default model (``increlora.assets``) is internal.
"""
from .adapter_file import (
    TASK_TYPES,
    Adapter,
    ModuleFactors,
    check_base_model,
    default_pooling,
    load_adapter,
    read_adapter,
    save_adapter,
)
from .allocator import GrowthEvent, RankAllocator
from .checkpoint import load_checkpoint, save_checkpoint
from .config import IncreLoraConfig
from .errors import (
                     AdapterFormatError,
                     AssetError,
                     BaseModelMismatchError,
                     CheckpointError,
                     ConfigError,
                     IncreLoraError,
                     TargetModulesError,
)
from .fingerprint import model_fingerprint
from .layer import IncreLoraLinear
from .model import apply_increlora, increlora_layers, orth_loss, rank_pattern, trainable_parameter_count
from .peft_interop import export_peft, import_peft
from .pretrained import load_model
from .schedule import GrowthPlan, RestartWarmupScheduler, plan_growth, restart_warmup_factor

__all__ = [
    "Adapter", "AdapterFormatError", "AssetError", "BaseModelMismatchError", "CheckpointError", "ConfigError",
    "GrowthEvent", "GrowthPlan", "IncreLoraConfig", "IncreLoraError", "IncreLoraLinear", "ModuleFactors",
    "RankAllocator", "RestartWarmupScheduler", "TASK_TYPES", "TargetModulesError", "apply_increlora",
    "check_base_model", "default_pooling", "export_peft", "import_peft", "increlora_layers", "load_adapter",
    "load_checkpoint", "load_model", "model_fingerprint", "orth_loss", "plan_growth", "rank_pattern",
    "read_adapter", "restart_warmup_factor", "save_adapter", "save_checkpoint", "trainable_parameter_count",
]
