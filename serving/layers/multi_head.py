"""MultiHead: a module trained in full per task (classifier, pooler, ...) applied per task to its rows.

Each task's own copy of the module runs on its rows; rows of tasks that did not save this module
go through the base model's module. Outputs that differ only in their last dimension (classifiers
with different numbers of labels) are zero-padded to the widest; the bank slices each row back.
This needs no per-architecture code: any head whose inputs and outputs are [batch, ...] works.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.threads import one_thread
from .batch_context import current_batch


def _rows(value: Any, start: int, end: int, size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
        return value[start:end]
    return value


def concat_rows(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the last dimension to the widest part."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.shape[-1] for p in parts)
    if any(p.shape[1:-1] != parts[0].shape[1:-1] for p in parts):
        raise RuntimeError(f"{name}: task heads give outputs of shapes {[tuple(p.shape) for p in parts]}; "
                           "they may differ only in their last dimension")
    return torch.cat([p if p.shape[-1] == width else F.pad(p, (0, width - p.shape[-1])) for p in parts])


class MultiHead(nn.Module):
    """Wraps the base model's module; per-task copies come from the running batch's tasks."""

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        batch = current_batch()
        if batch is None:
            return self.base_layer(*args, **kwargs)
        # consecutive segments with the same module (e.g. all using the base one) run as one call
        runs: list[tuple[nn.Module, int, int]] = []
        for seg in batch.segments:
            module = seg.task.heads.get(self.name, self.base_layer)
            if runs and runs[-1][0] is module:
                runs[-1] = (module, runs[-1][1], seg.end)
            else:
                runs.append((module, seg.start, seg.end))
        parts = []
        device = next((v.device for v in args if isinstance(v, torch.Tensor)), torch.device("cpu"))
        with one_thread(device):  # small per-task heads
            for module, start, end in runs:
                a = [_rows(v, start, end, batch.size) for v in args]
                kw = {k: _rows(v, start, end, batch.size) for k, v in kwargs.items()}
                out = module(*a, **kw)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"{self.name}: a saved module must return one tensor, got {type(out).__name__}")
                parts.append(out)
        return concat_rows(parts, self.name)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
