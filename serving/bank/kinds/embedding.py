"""Embedding (bi-encoder): the last hidden state pooled as the adapter says (the mean over the row's
tokens, or the first token's state), L2-normalised when it says so. Pooling is done in float32.

    {"task": str, "embedding": [float, ...], "tokens": int}
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from increlora.adapter_file import EMBEDDING, Adapter

from ..base_layout import BaseLayout
from ..errors import AdapterShapeError
from .base import Kind, RowOutput

if TYPE_CHECKING:
    from ..task_adapter import TaskAdapter


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """hidden [n, seq, h], mask [n, seq] -> [n, h] float32."""
    hidden = hidden.float()
    if mode == "cls":
        vectors = hidden[:, 0]
    else:
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # [n, seq, 1]
        vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors


class Embedding(Kind):
    task_type = EMBEDDING

    def output_part(self, adapter: Adapter, layout: BaseLayout, device: torch.device, dtype: torch.dtype) -> Any:
        outside = [m for m in adapter.modules_to_save if not layout.in_backbone(m)]
        if outside:
            raise AdapterShapeError(f"{adapter.path}: an embedding adapter may save backbone modules only; "
                                    f"{outside} are outside the backbone {layout.prefix!r} (not served)")
        return adapter.pooling

    def rows(self, task: TaskAdapter, hidden: torch.Tensor | None, mask: torch.Tensor,
             logits: torch.Tensor | None) -> torch.Tensor:
        return pool(hidden, mask, task.output["mode"], task.output["normalize"])

    def answer(self, task: TaskAdapter, row: RowOutput, tokenizer: Any) -> dict[str, Any]:
        return {"task": task.name, "embedding": row.values.tolist(), "tokens": row.tokens}

    def info(self, task: TaskAdapter) -> dict[str, Any]:
        return {"pooling": dict(task.output), "dimensions": task.dimensions}
