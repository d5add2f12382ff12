"""The tiny base with a tokenizer that knows its words, and adapters on it, for the HTTP tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import _vocab, make_tiny_base, tiny_classifier


def make_http_base(folder: Path) -> Path:
    """tests.tiny's base with a tokenizer that knows its words: under transformers 5 the one make_tiny_base
    saves (BertTokenizerFast(vocab_file=...)) maps every word to [UNK], so all texts of one length would
    get the same answer and a swapped answer would go unseen."""
    from transformers import BertTokenizerFast

    folder = make_tiny_base(folder, seed=0)
    kw = dict(do_lower_case=True, model_max_length=64)
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), **kw)
    if tokenizer.convert_tokens_to_ids("good") == tokenizer.unk_token_id:
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(_vocab())}, **kw)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_adapters(folder: Path, base_dir: Path, tasks: dict[str, int]) -> Path:
    """Adapter folders `folder/<task>` on the tiny base, with random non-zero low-rank updates and strong heads."""
    import torch

    from increlora import IncreLoraConfig, apply_increlora, save_adapter

    for i, (task, num_labels) in enumerate(tasks.items()):
        model = tiny_classifier(base_dir, num_labels, seed=10 + i)
        apply_increlora(model, IncreLoraConfig(init_rank=2, target_avg_rank=2.0, lora_dropout=0.0))
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.3)
                elif name.startswith("classifier."):  # a strong head: answers differ visibly between inputs
                    p.normal_(0.0, 1.0)
        kw = {"labels": [f"{task}_{j}" for j in range(num_labels)]} if num_labels > 1 else {}
        save_adapter(model.eval(), folder / task, task=task, **kw)
    return folder


def expected(bank, task, inputs):
    rows = bank.predict([x if isinstance(x, str) else tuple(x) for x in inputs], [task] * len(inputs))
    return [{k: v for k, v in r.items() if k != "task"} for r in rows]


def assert_predictions(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        if "value" in w:
            assert g["value"] == pytest.approx(w["value"], abs=1e-5)
        else:
            assert g["label"] == w["label"] and g["score"] == pytest.approx(w["score"], abs=1e-5)
            assert g["scores"] == pytest.approx(w["scores"], abs=1e-5)
