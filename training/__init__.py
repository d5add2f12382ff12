"""Training IncreLoRA adapters (and LoRA / AdaLoRA baselines) with the Hugging Face Trainer."""
from .callback import IncreLoraCallback
from .trainer import IncreLoraTrainer

__all__ = ["IncreLoraCallback", "IncreLoraTrainer"]
