"""Task metrics with scikit-learn and scipy (GLUE's definitions), from logits or regression outputs.

Ranking metrics (rerankers: MRR@10 and NDCG@10 over each query's documents; embeddings reuse
`reciprocal_rank`) count ties against the relevant document, so a constant scorer gets no credit.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, ndcg_score

from .data import REGRESSION, DataError, TaskDefinition

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
REGRESSION_METRICS = ("pearson", "spearman")
RANKING_METRICS = ("mrr@10", "ndcg@10")


def predicted_labels(definition: TaskDefinition, predictions) -> np.ndarray:
    """Class ids from logits [n, num_labels] (argmax) or ids [n]; floats [n] or [n, 1] for regression."""
    p = np.asarray(predictions)
    if definition.problem_type == REGRESSION:
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        if p.ndim != 1:
            raise DataError(f"regression predictions must have shape [n] or [n, 1], got {list(p.shape)}")
        return p.astype(np.float64)
    if p.ndim == 2:
        if p.shape[1] != definition.num_labels:
            raise DataError(f"logits have {p.shape[1]} columns, task {definition.name!r} has "
                            f"{definition.num_labels} labels")
        return p.argmax(axis=1)
    if p.ndim != 1:
        raise DataError(f"predictions must be logits [n, num_labels] or class ids [n], got shape {list(p.shape)}")
    return p.astype(np.int64)


def compute_metrics(definition: TaskDefinition, predictions, labels, groups=None) -> dict[str, float]:
    """The task's metrics, plus "combined" (their mean, GLUE's score for MRPC/QQP/STS-B) and "main".

    f1 is the f1 of class 1 for two classes (GLUE's MRPC/QQP convention) and macro f1 otherwise.
    An undefined correlation (constant predictions) counts as 0, as sklearn does for MCC.
    Ranking metrics (rerankers) need `groups`, the query id of each row.
    """
    if any(m in RANKING_METRICS for m in definition.metrics):
        return _with_main(definition, ranking_metrics(definition, predictions, labels, groups))
    y_pred = predicted_labels(definition, predictions)
    y_true = np.asarray(labels)
    if y_true.shape != y_pred.shape:
        raise DataError(f"{y_pred.shape[0]} predictions for {y_true.shape[0]} labels")
    if y_true.size == 0:
        raise DataError("no predictions to score")
    return _with_main(definition, {m: _metric(m, definition, y_pred, y_true) for m in definition.metrics})


def _with_main(definition: TaskDefinition, out: dict[str, float]) -> dict[str, float]:
    """Add "combined" (the mean of the metrics) and "main" (the task's main metric)."""
    out["combined"] = float(np.mean(list(out.values())))
    if definition.main_metric not in out:
        raise DataError(f"main metric {definition.main_metric!r} of task {definition.name!r} is not among "
                        f"its metrics {definition.metrics} or 'combined'")
    out["main"] = out[definition.main_metric]
    return out


def _metric(name: str, d: TaskDefinition, y_pred: np.ndarray, y_true: np.ndarray) -> float:
    if name in REGRESSION_METRICS:
        y_true = y_true.astype(np.float64)
        if np.all(y_pred == y_pred[0]) or np.all(y_true == y_true[0]):
            return 0.0
        value = (pearsonr if name == "pearson" else spearmanr)(y_pred, y_true)[0]
        return 0.0 if math.isnan(value) else float(value)
    y_true = y_true.astype(np.int64)
    if name == "accuracy":
        return float(accuracy_score(y_true, y_pred))
    if name == "matthews_correlation":
        return float(matthews_corrcoef(y_true, y_pred))
    if name == "f1":
        labels = list(range(d.num_labels))
        if d.num_labels == 2:
            return float(f1_score(y_true, y_pred, labels=labels, pos_label=1, average="binary", zero_division=0))
        return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    raise DataError(f"unknown metric {name!r}; known: {CLASSIFICATION_METRICS + REGRESSION_METRICS}")


def relevance(definition: TaskDefinition, predictions) -> np.ndarray:
    """A reranker's score per row: its single logit, or logit(relevant) - logit(other) (the order of P(relevant))."""
    p = np.asarray(predictions, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        return p[:, 0]
    if p.ndim == 2 and p.shape[1] == 2:
        return p[:, 1] - p[:, 0]
    raise DataError(f"reranker predictions must have shape [n, 1] or [n, 2], got {list(p.shape)} "
                    f"(task {definition.name!r})")


def reciprocal_rank(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> float:
    """1 / rank of the best-ranked relevant item if within the top k, else 0; ties count against it."""
    if not relevant.any():
        return 0.0
    best = scores[relevant].max()
    rank = 1 + int(np.sum(scores[~relevant] >= best))
    return 1.0 / rank if rank <= k else 0.0


def ranking_metrics(definition: TaskDefinition, predictions, labels, groups) -> dict[str, float]:
    """MRR@10 and NDCG@10 over the rows of each group (one query and its documents), averaged over groups."""
    if groups is None:
        raise DataError(f"task {definition.name!r}: ranking metrics need the query of each row")
    scores, relevant = relevance(definition, predictions), np.asarray(labels) > 0
    groups = np.asarray(groups)
    if not len(scores) == len(relevant) == len(groups):
        raise DataError(f"{len(scores)} predictions, {len(relevant)} labels and {len(groups)} query ids")
    mrr, ndcg = [], []
    for g in dict.fromkeys(groups.tolist()):
        rows = groups == g
        mrr.append(reciprocal_rank(scores[rows], relevant[rows]))
        ndcg.append(float(ndcg_score([relevant[rows].astype(float)], [scores[rows]], k=10))
                    if rows.sum() > 1 else float(relevant[rows][0]))
    out = {"mrr@10": float(np.mean(mrr)), "ndcg@10": float(np.mean(ndcg))}
    return {m: out[m] for m in definition.metrics}
