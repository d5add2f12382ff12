"""Tiny adapters with heterogeneous ranks, and the slow twin they are checked against (one adapter alone)."""
from __future__ import annotations

import functools
import random
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

from increlora import IncreLoraConfig, apply_increlora, increlora_layers, load_adapter, read_adapter, save_adapter
from tests.tiny import tiny_classifier

# task -> (num_labels, problem_type)
TASKS = {
    "sst2": (2, "single_label_classification"),
    "topic": (3, "single_label_classification"),
    "stsb": (1, "regression"),
    "tags": (4, "multi_label_classification"),
    "mrpc": (2, "single_label_classification"),
}


TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def kind_model(base: Path, task_type: str = "sequence-classification", num_labels: int = 2, seed: int = 0):
    """A plain transformers model of the kind: a classifier, a token classifier, or the bare backbone."""
    if task_type == "sequence-classification":
        return tiny_classifier(base, num_labels, seed=seed)
    torch.manual_seed(seed)
    if task_type == "token-classification":
        return AutoModelForTokenClassification.from_pretrained(str(base), num_labels=num_labels)
    return AutoModel.from_pretrained(str(base))


def make_adapter(base: Path, folder: Path, task: str, num_labels: int = 2, seed: int = 0,
                 problem_type: str | None = None, max_rank: int = 4,
                 task_type: str = "sequence-classification", **save_kw) -> Path:
    """An adapter with random per-module ranks in 0..max_rank (some 0), random factors and head.

    Token classification: tags TAGS[:num_labels]; embedding: trained as a bare AutoModel, mean pooling
    unless save_kw gives pooling.
    """
    rng = random.Random(seed)
    model = kind_model(base, task_type, num_labels, seed)
    saved = [] if task_type == "embedding" else None  # an embedding adapter usually saves no module
    apply_increlora(model, IncreLoraConfig(init_rank=1, target_avg_rank=2.0, lora_dropout=0.0,
                                           advance_learning=False, modules_to_save=saved))
    layers = list(increlora_layers(model))
    for i, (_, layer) in enumerate(layers):
        rank = 0 if i == 0 else rng.randint(0, max_rank)  # at least one module of rank 0
        if rank == 0:
            layer.set_structure([], reserves=False)
        elif rank > 1:
            layer.grow(rank - 1)
    torch.manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "classifier" in name or "pooler" in name:
                p.normal_(0.0, 0.3)
    if task_type == "embedding":
        save_kw.setdefault("pooling", {"mode": "mean", "normalize": True})
        return save_adapter(model.eval(), folder / task, task=task, task_type=task_type, **save_kw)
    labels = TAGS[:num_labels] if task_type == "token-classification" else [f"{task}_{j}" for j in range(num_labels)]
    return save_adapter(model.eval(), folder / task, task=task, labels=labels, task_type=task_type,
                        problem_type=problem_type, **save_kw)


@functools.cache
def adapter_set(base: Path, folder: Path) -> Path:
    """folder/<task> for every task of TASKS (made once per base and folder)."""
    for i, (task, (n, pt)) in enumerate(TASKS.items()):
        make_adapter(base, folder, task, n, seed=i, problem_type=pt)
    return folder


def encode(tokenizer, x) -> dict:
    """One input as a batch of one. (A single call drops an empty text_pair; a batched call keeps it.)"""
    args = ([x],) if isinstance(x, str) else ([x[0]], [x[1]])
    return tokenizer(*args, return_tensors="pt")


@functools.cache
def reference_model(base: Path, adapter_dir: Path):
    """The slow twin: the adapter alone, loaded with increlora.load_adapter into a fresh base model."""
    adapter = read_adapter(adapter_dir)
    if adapter.task_type == "embedding":
        model = AutoModel.from_pretrained(str(base))
    else:
        auto = AutoModelForTokenClassification if adapter.task_type == "token-classification" \
            else AutoModelForSequenceClassification
        model = auto.from_pretrained(str(base), num_labels=adapter.num_labels)
    return load_adapter(model, adapter).eval()
