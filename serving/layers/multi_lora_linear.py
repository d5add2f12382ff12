"""MultiLoraLinear: a frozen nn.Linear plus, per row, the low-rank update of that row's task."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import lora_segments
from .batch_context import current_batch


class MultiLoraLinear(nn.Module):
    """Wraps the base layer; the task factors come from the running batch's context, not from here.

    Outside a batch context it is exactly the base layer. The base layer is kept as `base_layer`
    so the base model's fingerprint sees the same parameter names.
    """

    def __init__(self, base_layer: nn.Linear, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = current_batch()
        if batch is None or not batch.adapts(self.name):
            return self.base_layer(x)
        if x.shape[0] != batch.size:
            raise RuntimeError(f"{self.name}: input has {x.shape[0]} rows in dim 0, the batch has {batch.size}; "
                               "only layers whose inputs are [batch, ...] can be adapted")
        out = self.base_layer(x)
        per_row = x[0].numel() // self.in_features  # tokens of one example
        rows, out_rows = x.reshape(-1, self.in_features), out.view(-1, self.out_features)
        if batch.backend == "triton":
            from ..ops.triton_segments import lora_segments_packed

            lora_segments_packed(rows, out_rows, batch.triton_table(per_row, x.device), self.name)
            return out
        work = batch.work_for(self.name)
        segments = [(s * per_row, e * per_row) for s, e in work.segments]
        lora_segments(rows, segments, work.A, work.B, out_rows)
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in={self.in_features}, out={self.out_features}"
