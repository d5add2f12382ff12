"""Embedding (bi-encoder) tasks: pairs in, one pooled sentence vector per text out.

Data: rows of `anchor,positive[,negative]` (trained with the multiple-negatives ranking loss: every
other positive in the batch, and the hard negatives when given, is a negative; scale 20 as in
sentence-transformers) or `sentence1,sentence2,score` (cosine-similarity regression: MSE between
the pair's cosine and its score, scores divided by the largest |score| of the training file when
that is over 1). Metrics: for anchor/positive pairs, MRR@10 and recall@1/10 of each held-out anchor
against the corpus of all held-out positives; for scored pairs, Spearman of cosine against score.

The backbone is trained under its task-head attribute name (`bert` for BERT), so the adapter's
module names are the full names that every kind shares on one base model. Pooling follows the
base model's sentence-transformers config (`increlora.default_pooling`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from transformers import AutoModel
from transformers.utils import ModelOutput

from increlora import IncreLoraConfig, default_pooling

from ..data import (
    REGRESSION,
    DataError,
    Example,
    ItemsDataset,
    TaskData,
    TaskDefinition,
    check_splits,
    cut_to_tokens,
    read_table,
    text_value,
)
from ..metrics import reciprocal_rank

HEAD_LR_SCALE = 1.0  # no head
TASK_TYPE = "embedding"
LOCAL_FILES = "anchor,positive[,negative] or sentence1,sentence2,score"
CONTRASTIVE = "contrastive"  # the problem_type of anchor/positive tasks (scored pairs are REGRESSION)
SCALE = 20.0
SIDES = ("anchor", "positive", "negative")
RETRIEVAL_METRICS = ("mrr@10", "recall@1", "recall@10")
PAIR_COLUMNS = ("anchor", "positive")
SCORED_COLUMNS = ("sentence1", "sentence2", "score")


# ---------------------------------------------------------------------------------------------------
# the model: backbone, pooling, loss


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: dict) -> torch.Tensor:
    """[batch, tokens, hidden] -> [batch, hidden]: the mean over real tokens, or the first token."""
    if pooling["mode"] == "cls":
        out = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(out, dim=-1) if pooling["normalize"] else out


@dataclasses.dataclass
class EmbeddingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    anchor: torch.Tensor | None = None  # [batch, hidden]
    positive: torch.Tensor | None = None  # [batch, hidden]


def ranking_loss(anchor: torch.Tensor, candidates: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """Multiple-negatives ranking loss: anchor i's positive is candidate i; all other candidates are negatives."""
    scores = scale * F.normalize(anchor, dim=-1) @ F.normalize(candidates, dim=-1).T  # [batch, candidates]
    return F.cross_entropy(scores, torch.arange(len(anchor), device=anchor.device))


def cosine_loss(a: torch.Tensor, b: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(F.cosine_similarity(a, b, dim=-1), score.to(a.dtype))


class BiEncoder(nn.Module):
    """A backbone (kept under its `base_model_prefix`) that pools each text and trains on pairs."""

    def __init__(self, backbone: nn.Module, pooling: dict, scored: bool, scale: float = SCALE):
        super().__init__()
        self.base_model_prefix = backbone.base_model_prefix or "model"
        setattr(self, self.base_model_prefix, backbone)
        self.config, self.pooling, self.scored, self.scale = backbone.config, pooling, scored, scale

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def encode(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, anchor_input_ids, anchor_attention_mask, positive_input_ids, positive_attention_mask,
                anchor_token_type_ids=None, positive_token_type_ids=None, negative_input_ids=None,
                negative_attention_mask=None, negative_token_type_ids=None, labels=None) -> EmbeddingOutput:
        a = self.encode(anchor_input_ids, anchor_attention_mask, anchor_token_type_ids)
        p = self.encode(positive_input_ids, positive_attention_mask, positive_token_type_ids)
        if self.scored:
            loss = cosine_loss(a, p, labels) if labels is not None else None
        else:
            candidates = p
            if negative_input_ids is not None:
                n = self.encode(negative_input_ids, negative_attention_mask, negative_token_type_ids)
                candidates = torch.cat([p, n])
            loss = ranking_loss(a, candidates, self.scale)
        return EmbeddingOutput(loss=loss, anchor=a, positive=p)


# ---------------------------------------------------------------------------------------------------
# the kind's interface (see training.kinds)


def load_model(path: str, d: TaskDefinition) -> BiEncoder:
    return BiEncoder(AutoModel.from_pretrained(path), default_pooling(path), scored=d.problem_type == REGRESSION)


def adjust_config(config: IncreLoraConfig) -> IncreLoraConfig:
    # no head: nothing is trained in full unless asked (BERT's default would train its unused pooler)
    return config if config.modules_to_save is not None else dataclasses.replace(config, modules_to_save=[])


def to_dataset(d: TaskDefinition, rows: Sequence[Example], tokenizer, max_length: int) -> ItemsDataset:
    sides = {"anchor": [e.text for e in rows], "positive": [e.text_pair for e in rows]}
    if rows and rows[0].negative is not None:
        sides["negative"] = [e.negative for e in rows]
    items = [{"labels": float(e.label)} for e in rows]
    for side, texts in sides.items():  # cut first: a long document's first tokens without reading all of it
        enc = tokenizer(cut_to_tokens(tokenizer, texts, max_length), truncation=True, max_length=max_length)
        for key, values in enc.items():
            for item, v in zip(items, values):
                item[f"{side}_{key}"] = v
    return ItemsDataset(items)


class PairCollator:
    """Pads each side (anchor, positive, negative) of a batch on its own."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        out = {}
        for side in SIDES:
            if f"{side}_input_ids" not in items[0]:
                continue
            part = [{k[len(side) + 1:]: v for k, v in it.items() if k.startswith(side + "_")} for it in items]
            out.update({f"{side}_{k}": v for k, v in self.tokenizer.pad(part, return_tensors="pt").items()})
        out["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.float32)
        return out


def collator(tokenizer) -> PairCollator:
    return PairCollator(tokenizer)


def compute_metrics(d: TaskDefinition, predictions, labels, rows: Sequence[Example]) -> dict[str, float]:
    anchors, positives = (np.asarray(p, dtype=np.float64) for p in predictions)
    if d.problem_type == REGRESSION:
        out = {"spearman": scored_spearman(anchors, positives, np.asarray(labels, dtype=np.float64))}
    else:
        out = retrieval_metrics(anchors, positives, [e.text_pair for e in rows])
    out["combined"] = float(np.mean(list(out.values())))
    out["main"] = out[d.main_metric]
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def scored_spearman(anchors: np.ndarray, positives: np.ndarray, scores: np.ndarray) -> float:
    cos = np.sum(_unit(anchors) * _unit(positives), axis=1)
    if np.all(cos == cos[0]) or np.all(scores == scores[0]):
        return 0.0
    value = spearmanr(cos, scores)[0]
    return 0.0 if math.isnan(value) else float(value)


def retrieval_metrics(anchors: np.ndarray, positives: np.ndarray, positive_texts: Sequence[str]) -> dict[str, float]:
    """Each anchor against the corpus of all distinct positives, by cosine; its own positive is relevant."""
    if len(anchors) == 0:
        raise DataError("no pairs to score")
    first = {t: i for i, t in reversed(list(enumerate(positive_texts)))}  # a text's first row
    docs = sorted(set(first.values()))
    column = {i: j for j, i in enumerate(docs)}
    sims = _unit(anchors) @ _unit(positives[docs]).T  # [queries, corpus]
    rr = []
    for i, text in enumerate(positive_texts):
        relevant = np.zeros(len(docs), dtype=bool)
        relevant[column[first[text]]] = True
        rr.append(reciprocal_rank(sims[i], relevant, k=len(docs)))
    rr = np.asarray(rr)
    ranks = np.where(rr > 0, 1.0 / np.maximum(rr, 1e-12), np.inf)
    return {"mrr@10": float(np.mean(np.where(ranks <= 10, rr, 0.0))), "recall@1": float(np.mean(ranks <= 1)),
            "recall@10": float(np.mean(ranks <= 10))}


def check_train(d: TaskDefinition, rows) -> None:
    if len(rows) < 2:
        raise DataError(f"task {d.name!r}: an embedding task needs at least two training pairs")


def adapter_fields(d: TaskDefinition, model_path: str) -> dict:
    return {"task_type": TASK_TYPE, "labels": [], "num_labels": 0, "problem_type": None,
            "pooling": default_pooling(model_path)}


@torch.no_grad()
def encode_texts(model: BiEncoder, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64):
    """Pooled vectors of `texts` [n, hidden] (evaluation and baselines)."""
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        out.append(model.encode(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")))
    return torch.cat(out).float().numpy()


# ---------------------------------------------------------------------------------------------------
# local files


def definition(name: str, scored: bool, score_max: float = 1.0, **kw) -> TaskDefinition:
    metrics = ("spearman",) if scored else RETRIEVAL_METRICS
    return TaskDefinition(name=name, text_fields=("sentence1", "sentence2") if scored else PAIR_COLUMNS,
                          problem_type=REGRESSION if scored else CONTRASTIVE, metrics=metrics,
                          main_metric=metrics[0], label_range=(0.0, score_max) if scored else None,
                          task_type=TASK_TYPE, **kw)


def read_pairs(path: str | Path, score_max: float | None = None) -> tuple[list[Example], bool, float]:
    """(pairs, scored?, score divisor) of a file with anchor,positive[,negative] or sentence1,sentence2,score."""
    rows = list(read_table(path))
    if not rows:
        raise DataError(f"{path}: no data rows")
    columns = set(rows[0].values)
    scored = set(SCORED_COLUMNS) <= columns
    if not scored and not set(PAIR_COLUMNS) <= columns:
        raise DataError(f"{rows[0].where}: an embedding file needs columns anchor,positive[,negative] or "
                        f"sentence1,sentence2,score; columns present: {sorted(map(str, columns))}")
    hard = not scored and "negative" in columns
    out = []
    for r in rows:
        names = SCORED_COLUMNS[:2] if scored else PAIR_COLUMNS + (("negative",) if hard else ())
        texts = []
        for c in names:
            if c not in r.values:
                raise DataError(f"{r.where}: missing column {c!r}")
            texts.append(text_value(r, c))
            if not texts[-1].strip():
                raise DataError(f"{r.where}: column {c!r} is empty; every pair needs both texts")
        label = 1.0
        if scored:
            try:
                label = float(r.values["score"])
            except (TypeError, ValueError):
                raise DataError(f"{r.where}: score {r.values['score']!r} is not a number") from None
            if not math.isfinite(label):
                raise DataError(f"{r.where}: score {label} is not finite")
        out.append(Example(texts[0], texts[1], label, negative=texts[2] if hard else None))
    if scored:
        score_max = score_max or max(1.0, max(abs(e.label) for e in out))
        out = [dataclasses.replace(e, label=e.label / score_max) for e in out]
    return out, scored, score_max or 1.0


def load_local(name: str, train, validation=None, test=None, split_seed: int = 42, **_) -> TaskData:
    from ..data import grouped_split, split_rows

    rows, scored, score_max = read_pairs(train)
    d = definition(name, scored, score_max, split_seed=split_seed, source="local",
                   split_fractions=(0.9, 0.1, 0.0) if validation is None else (1.0, 0.0, 0.0),
                   test_splits=("test",) if test is not None else ())
    if validation is None:
        parts = grouped_split([e.text for e in rows], None, d.split_fractions, split_seed)
        splits = split_rows(rows, parts, ("train", "validation", "test"))
        del splits["test"]
    else:
        splits = {"train": rows, "validation": _same_kind(read_pairs(validation, score_max), scored, validation)}
    if test is not None:
        splits["test"] = _same_kind(read_pairs(test, score_max), scored, test)
    return check_splits(TaskData(d, splits))


def _same_kind(read: tuple[list[Example], bool, float], scored: bool, path) -> list[Example]:
    if read[1] != scored:
        raise DataError(f"{path}: {'scored' if read[1] else 'anchor/positive'} pairs, but the training file has "
                        f"{'scored' if scored else 'anchor/positive'} pairs")
    return read[0]
