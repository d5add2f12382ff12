"""Sequence classification and regression: the task model's own head (pooler, classifier, ...) run per
task inside the model (MultiHead); answers by problem type. A reranker is such a task over (query,
document) pairs with one output (its score, through a sigmoid) or two (the probability of label 1).

Classification (single-label: softmax; multi-label: sigmoid):
    {"task": str, "label": str, "score": float, "scores": {label: probability}}
    multi-label answers also carry "labels": the labels whose probability is at least 0.5.
Regression: {"task": str, "value": float} (a list of floats when the head has several outputs).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from increlora.adapter_file import SEQUENCE_CLASSIFICATION, Adapter

from ..base_layout import BaseLayout
from ..errors import InputError, WrongTaskKindError
from .base import Kind, RowOutput

if TYPE_CHECKING:
    from ..task_adapter import TaskAdapter


class SequenceClassification(Kind):
    task_type = SEQUENCE_CLASSIFICATION
    uses_logits = True

    def model_modules(self, adapter: Adapter, layout: BaseLayout) -> list[str]:
        return adapter.modules_to_save  # the head is the task model's: all of it runs in the model

    def rows(self, task: TaskAdapter, hidden: torch.Tensor | None, mask: torch.Tensor,
             logits: torch.Tensor | None) -> torch.Tensor:
        return logits[:, :task.num_labels]  # the padding of narrower heads dropped

    def answer(self, task: TaskAdapter, row: RowOutput, tokenizer: Any) -> dict[str, Any]:
        values = row.values
        if task.problem_type == "regression":
            out = values.tolist()
            return {"task": task.name, "value": out[0] if len(out) == 1 else out}
        multi = task.problem_type == "multi_label_classification"
        probs = (torch.sigmoid(values) if multi else torch.softmax(values, dim=-1)).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        result = {"task": task.name, "label": task.labels[best], "score": probs[best],
                  "scores": dict(zip(task.labels, probs))}
        if multi:
            result["labels"] = [label for label, p in zip(task.labels, probs) if p >= 0.5]
        return result


def check_reranker(info: dict[str, Any]) -> None:
    """WrongTaskKindError unless the task (its task_info) scores pairs: sequence classification, 1 or 2 outputs."""
    task_type = info.get("task_type", SEQUENCE_CLASSIFICATION)
    if task_type != SEQUENCE_CLASSIFICATION:
        raise WrongTaskKindError(info["name"], task_type, "reranking needs a sequence-classification task over "
                                 "(query, document) pairs (a cross-encoder)")
    if info["num_labels"] not in (1, 2):
        raise WrongTaskKindError(info["name"], task_type, "reranking needs a cross-encoder with 1 output (a score) "
                                 "or 2 labels (label 1 = relevant)", f"it has {info['num_labels']} labels")


def relevance(answer: dict[str, Any]) -> float:
    """A reranker's score for one pair, from its answer: sigmoid of a single output, else P(label index 1)."""
    if "value" in answer:
        return 1.0 / (1.0 + math.exp(-float(answer["value"])))
    return float(list(answer["scores"].values())[1])


def rerank_results(answers: Sequence[dict[str, Any]], top_n: int | None = None) -> list[dict[str, Any]]:
    """[{"index": i, "relevance_score": s}] best first (ties in document order), at most top_n."""
    scored = sorted(((relevance(a), i) for i, a in enumerate(answers)), key=lambda si: (-si[0], si[1]))
    return [{"index": i, "relevance_score": s} for s, i in scored[:top_n]]


def rerank_pairs(query: Any, documents: Any, top_n: Any = None) -> list[tuple[str, str]]:
    """(query, document) pairs, or InputError for a query that is not a text, documents not a list of texts
    or a top_n that is not a positive integer (or None)."""
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InputError(f"rerank: top_n must be a positive integer or None, got {top_n!r}")
    if not isinstance(query, str):
        raise InputError(f"rerank: query must be a text, got {type(query).__name__}")
    if isinstance(documents, str) or not isinstance(documents, Sequence) or not documents \
            or not all(isinstance(d, str) for d in documents):
        raise InputError("rerank: documents must be a non-empty list of texts")
    return [(query, d) for d in documents]
