"""Answers: one dict per input, made by its task's kind from the row's output.

Each kind's module in serving/bank/kinds/ gives the shape of its answers: sequence.py (classification
and regression: label, score, scores / value), embedding.py (embedding, tokens), tokens.py (entities).
All are plain dicts of lists, strings and numbers, so they cross process boundaries as they are.
"""
from __future__ import annotations

from typing import Any

from .kinds import RowOutput
from .task_adapter import TaskAdapter

Prediction = dict[str, Any]


def answer(task: TaskAdapter, row: RowOutput, tokenizer: Any) -> Prediction:
    return task.kind.answer(task, row, tokenizer)
