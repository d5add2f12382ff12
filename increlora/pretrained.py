"""One call from an adapter folder to a ready Hugging Face model."""
from __future__ import annotations

import os

import torch
from torch import nn

from .adapter_file import EMBEDDING, TOKEN_CLASSIFICATION, Adapter, load_adapter, read_adapter
from .assets import resolve_model


def load_model(adapter_path: str | os.PathLike, base_model: str | None = None, *, device: str | None = None,
               dtype: str | torch.dtype | None = None) -> nn.Module:
    """Load the adapter's base model (or `base_model`: a hub id or local path) with the adapter applied.

    Returns, in eval mode, an AutoModelForSequenceClassification or AutoModelForTokenClassification
    with the adapter's labels set, or for an embedding adapter the bare AutoModel (pool its last hidden
    state as ``adapter.pooling`` says).
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    adapter: Adapter = read_adapter(adapter_path)
    name = resolve_model(base_model or adapter.base_model)
    id2label = dict(enumerate(adapter.labels))
    if adapter.task_type == EMBEDDING:
        model = AutoModel.from_pretrained(name)
    else:
        auto = AutoModelForTokenClassification if adapter.task_type == TOKEN_CLASSIFICATION \
            else AutoModelForSequenceClassification
        model = auto.from_pretrained(
            name, num_labels=adapter.num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()},
            problem_type=adapter.problem_type)
    load_adapter(model, adapter)  # fingerprint checked in float32, before any cast
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()
