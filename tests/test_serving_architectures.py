"""The bank serves other encoder families without per-architecture code (DistilBERT, RoBERTa heads)."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertModel,
    RobertaConfig,
    RobertaModel,
)

from increlora import IncreLoraConfig, apply_increlora, increlora_layers, load_adapter, save_adapter
from serving import AdapterBank
from tests.helpers.adapters import encode
from tests.tiny import _vocab


def make_base(folder, family: str, num_labels: int = 2):
    torch.manual_seed(0)
    if family == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=len(_vocab()), dim=32, n_layers=2, n_heads=4,
                                                 hidden_dim=64, max_position_embeddings=64))
    else:  # RoBERTa's head is a module of its own (dense + out_proj) fed [batch, seq, hidden]
        model = RobertaModel(RobertaConfig(vocab_size=len(_vocab()), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=66,
                                           type_vocab_size=2, pad_token_id=0), add_pooling_layer=False)
    model.config.num_labels = num_labels  # the default head from_pretrained builds for the bank
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64).save_pretrained(folder)
    return folder


def make_adapter(base, folder, task, num_labels, seed):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=num_labels)
    apply_increlora(model, IncreLoraConfig(init_rank=1, target_avg_rank=2.0, lora_dropout=0.0,
                                           advance_learning=False))
    for i, (_, layer) in enumerate(increlora_layers(model)):
        if i % 3:
            layer.grow(i % 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name.startswith(("classifier", "pre_classifier")):
                p.normal_(0.0, 0.3)
    return save_adapter(model.eval(), folder / task, task=task)


@pytest.mark.parametrize("family, base_labels", [("distilbert", 2), ("roberta", 2), ("roberta", 32)])
def test_mixed_batch_equals_each_adapter_alone(family, base_labels, tmp_path):
    # base_labels 32 = the hidden size: only the head's output layer has one row per label, not
    # RoBERTa's classifier.dense of the same shape
    base = make_base(tmp_path / "base", family, base_labels)
    make_adapter(base, tmp_path / "adapters", "two", 2, seed=1)
    make_adapter(base, tmp_path / "adapters", "three", 3, seed=2)
    bank = AdapterBank.load(tmp_path / "adapters", dtype="float32")
    assert sorted(bank.tasks) == ["three", "two"] and bank.load_errors == {}
    inputs = ["great film", ("a good plot", "the story"), "bad movie", "hello"]
    tasks = ["two", "three", "three", "two"]
    for x, t, got in zip(inputs, tasks, bank.logits(inputs, tasks)):
        model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=len(got))
        model = load_adapter(model, tmp_path / "adapters" / t).eval()
        with torch.no_grad():
            want = model(**{k: v for k, v in encode(bank.tokenizer, x).items()
                            if k != "token_type_ids" or family != "distilbert"}).logits[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_every_kind_mixes_in_one_batch_on_other_families(family, tmp_path):
    """A token head and pooling read the backbone's last state whatever the family's sequence head is
    (RoBERTa's is a two-layer module named `classifier`, like the token head)."""
    from transformers import AutoModel

    from tests.helpers.adapters import make_adapter, reference_model

    base = make_base(tmp_path / "base", family)
    folder = tmp_path / "adapters"
    make_adapter(base, folder, "seq", 3, seed=1)
    make_adapter(base, folder, "ner", 5, seed=2, task_type="token-classification")
    make_adapter(base, folder, "emb", seed=3, task_type="embedding")
    bank = AdapterBank.load(folder, dtype="float32")
    assert sorted(bank.tasks) == ["emb", "ner", "seq"] and bank.load_errors == {}
    inputs, tasks = ["great film", "hello world", "a good plot", "bad movie"], ["ner", "seq", "emb", "ner"]
    for x, t, got in zip(inputs, tasks, bank.logits(inputs, tasks)):
        enc = {k: v for k, v in encode(bank.tokenizer, x).items() if k != "token_type_ids" or family != "distilbert"}
        with torch.no_grad():
            if t == "emb":
                plain = load_adapter(AutoModel.from_pretrained(str(base)), folder / t).eval()
                want = plain(**enc).last_hidden_state[0].mean(dim=0)
                want = want / want.norm()
            else:
                want = reference_model(base, folder / t)(**enc).logits[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
