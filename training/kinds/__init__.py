"""The kinds of task training knows, one module each: its data reading, model, loss and metrics.

    sequence_classification  classes or a score from one text or a pair (also rerankers over pairs)
    embedding                a pooled sentence vector, trained contrastively or on scored pairs
    token_classification     a tag per word (NER, IOB2), scored by entity-level F1

The pipeline asks a task's kind for everything that differs between kinds (see `Kind`), so a kind
is read in one place. The kind names are the adapter format's `task_type` values.
"""
from __future__ import annotations

from . import embedding, sequence_classification, token_classification

KINDS = {m.TASK_TYPE: m for m in (sequence_classification, embedding, token_classification)}
TASK_TYPES = tuple(KINDS)
DEFAULT_TASK_TYPE = sequence_classification.TASK_TYPE


def kind_of(task_type: str):
    """The module of a kind (raises DataError naming the known kinds)."""
    from ..data import DataError

    if task_type not in KINDS:
        raise DataError(f"unknown task type {task_type!r}; choose one of {', '.join(TASK_TYPES)}")
    return KINDS[task_type]


__all__ = ["DEFAULT_TASK_TYPE", "KINDS", "TASK_TYPES", "kind_of"]
