"""What every kind of task gives the bank: which saved modules run inside the shared model, its own
output part, its input rules, the outputs of its rows and the answer made from one row."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from increlora.adapter_file import Adapter

from ..base_layout import BaseLayout
from ..batch_inputs import ModelInput, TokenRow

if TYPE_CHECKING:
    from ..task_adapter import TaskAdapter


@dataclass(frozen=True)
class RowOutput:
    """One row's raw output, float32 on the CPU, with what its answer needs of the input."""

    values: torch.Tensor  # sequence: [num_labels]; embedding: [hidden]; tokens: [tokens, num_labels]
    text: ModelInput
    tokens: int  # the row's tokens, specials included
    token_row: TokenRow | None = None  # token classification: ids, offsets, special-token mask


class Kind:
    """A kind of task; subclasses are stateless singletons (KINDS in kinds/__init__.py)."""

    task_type: str = ""
    uses_logits = False  # reads the task model's logits (sequence heads) rather than the last hidden state
    per_token = False  # its row output has one entry per token (cut to the row's length)
    needs_offsets = False  # its answers need the tokenizer's offsets (a fast tokenizer)

    def model_modules(self, adapter: Adapter, layout: BaseLayout) -> list[str]:
        """The saved modules that run inside the shared model, per task (MultiHead): backbone modules
        other than the pooler, which only sequence classifiers use."""
        return [m for m in adapter.modules_to_save if layout.in_backbone(m) and m not in layout.pooler]

    def output_part(self, adapter: Adapter, layout: BaseLayout, device: torch.device, dtype: torch.dtype) -> Any:
        """What the task needs after the backbone, built from the adapter (None: nothing)."""
        return None

    def check_input(self, task: TaskAdapter, index: int, item: ModelInput) -> None:
        """Raise InputError when the input does not suit the kind."""

    def rows(self, task: TaskAdapter, hidden: torch.Tensor | None, mask: torch.Tensor,
             logits: torch.Tensor | None) -> torch.Tensor:
        """The outputs of the task's rows: hidden [n, seq, h] (the backbone's last state), mask [n, seq],
        logits [n, widest head] (the task model's output)."""
        raise NotImplementedError

    def answer(self, task: TaskAdapter, row: RowOutput, tokenizer: Any) -> dict[str, Any]:
        raise NotImplementedError

    def info(self, task: TaskAdapter) -> dict[str, Any]:
        """Fields task_info adds for this kind."""
        return {}
