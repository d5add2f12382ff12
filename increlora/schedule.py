"""Learning-rate schedule with restart warmup.

Every optimizer param group has a start step (``group["increlora_start"]``, 0 for groups present
from the beginning). A group's LR warms up linearly over ``warmup_steps`` from its start, then decays
linearly to zero at ``total_steps``. Groups added at growth steps therefore get their own warmup.
Works as the Hugging Face Trainer's scheduler: call ``step()`` after every optimizer step.
"""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

START_KEY = "increlora_start"


def restart_warmup_factor(step: int, start: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier of a group that started at `start`, at optimizer step `step` (0-based)."""
    since = step - start
    if since < 0:
        return 0.0
    if since < warmup_steps:
        return since / warmup_steps
    remaining = total_steps - start - warmup_steps
    if remaining <= 0:
        return 0.0 if step >= total_steps else 1.0
    return max(0.0, (total_steps - step) / remaining)


class RestartWarmupScheduler(LRScheduler):
    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, last_epoch: int = -1):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        for group in optimizer.param_groups:
            group.setdefault(START_KEY, 0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, group: dict, step: int) -> float:
        base = group.get("initial_lr", group["lr"])
        return base * restart_warmup_factor(step, group.get(START_KEY, 0), self.warmup_steps, self.total_steps)

    def get_lr(self) -> list[float]:
        return [self.lr_at(g, self.last_epoch) for g in self.optimizer.param_groups]
