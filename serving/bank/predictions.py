"""Answers from logits, per the task's problem type.

Classification (single-label: softmax; multi-label: sigmoid):
    {"task": str, "label": str, "score": float, "scores": {label: probability}}
    multi-label answers also carry "labels": the labels whose probability is at least 0.5.
Regression: {"task": str, "value": float} (a list of floats when the head has several outputs).
"""
from __future__ import annotations

from typing import Any

import torch

from .task_adapter import TaskAdapter

Prediction = dict[str, Any]


def answer(task: TaskAdapter, logits: torch.Tensor) -> Prediction:
    """logits: [num_labels] of one row."""
    values = logits.float()
    if task.problem_type == "regression":
        out = values.tolist()
        return {"task": task.name, "value": out[0] if len(out) == 1 else out}
    multi = task.problem_type == "multi_label_classification"
    probs = (torch.sigmoid(values) if multi else torch.softmax(values, dim=-1)).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    result: Prediction = {"task": task.name, "label": task.labels[best], "score": probs[best],
                          "scores": dict(zip(task.labels, probs))}
    if multi:
        result["labels"] = [label for label, p in zip(task.labels, probs) if p >= 0.5]
    return result
