"""The kinds of task the bank serves, each in one module: which saved modules run inside the shared
model, its output part after the backbone, its input rules, its row outputs and its answer.

    sequence.py   sequence classification and regression (the task model's head); reranking scores
    embedding.py  pooled sentence vectors (mean or CLS), L2-normalised or not
    tokens.py     a per-token head; entity spans with character offsets
"""
from __future__ import annotations

from .base import Kind, RowOutput
from .embedding import Embedding
from .sequence import SequenceClassification, check_reranker, relevance, rerank_pairs, rerank_results
from .tokens import TokenClassification

KINDS: dict[str, Kind] = {k.task_type: k for k in (SequenceClassification(), Embedding(), TokenClassification())}


def kind_of(task_type: str) -> Kind:
    return KINDS[task_type]


__all__ = ["KINDS", "Embedding", "Kind", "RowOutput", "SequenceClassification", "TokenClassification",
           "check_reranker", "kind_of", "relevance", "rerank_pairs", "rerank_results"]
