"""Sequence classification and regression, single texts or pairs; rerankers are pair classifiers.

The data readers live in `training.data` / `training.tasks` and the metrics in `training.metrics`
(this was the only kind before the others); this module gives them the interface of a kind.
"""
from __future__ import annotations

from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from increlora import IncreLoraConfig

from ..data import REGRESSION, DataError, TaskDefinition, to_torch_dataset
from ..metrics import compute_metrics as _compute_metrics

HEAD_LR_SCALE = 1.0
TASK_TYPE = "sequence-classification"


def load_model(path: str, d: TaskDefinition):
    labels = {"id2label": d.id2label, "label2id": d.label2id} if d.label_names else {}
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=d.num_labels, problem_type=d.problem_type, **labels)


def adjust_config(config: IncreLoraConfig) -> IncreLoraConfig:
    return config


def to_dataset(d: TaskDefinition, rows, tokenizer, max_length: int):
    return to_torch_dataset(rows, tokenizer, max_length)


def collator(tokenizer):
    return DataCollatorWithPadding(tokenizer)


def compute_metrics(d: TaskDefinition, predictions, labels, rows) -> dict[str, float]:
    return _compute_metrics(d, predictions, labels, groups=[e.group for e in rows])


def check_train(d: TaskDefinition, rows) -> None:
    if d.problem_type != REGRESSION and len({e.label for e in rows}) < 2:
        raise DataError(f"task {d.name!r}: the training examples hold a single class; raise --max-train-examples")


def adapter_fields(d: TaskDefinition, model_path: str) -> dict:
    """What the adapter file records for this kind (a reranker says so in its metadata)."""
    fields = {"task_type": TASK_TYPE, "labels": list(d.label_names) or ["score"], "problem_type": d.problem_type}
    if "mrr@10" in d.metrics:
        fields["reranker"] = True
    return fields
