"""Tiny models built from a config in-process (hidden 32, 2 layers) with a small WordPiece tokenizer."""
from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizerFast

WORDS = ("the a an and or but not is was are be good bad great terrible film movie funny dull boring "
         "gripping plot actor story love hate free win prize call now money spam ham hello meet "
         "tomorrow sport politics business tech music game team vote market phone computer new old "
         "very really quite best worst ever never always i you he she it we they this that of to in").split()


def tiny_bert_config(**overrides) -> BertConfig:
    kw = dict(vocab_size=len(_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    kw.update(overrides)
    return BertConfig(**kw)


def _vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS


def make_tiny_base(folder: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Save a randomly initialised tiny BertModel and its tokenizer, like a pretrained checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    BertModel(tiny_bert_config(**config_overrides), add_pooling_layer=True).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(_vocab())}, do_lower_case=True,
                      model_max_length=64).save_pretrained(folder)
    return folder


def tiny_classifier(base_dir: str | Path, num_labels: int = 2, seed: int = 0, **kw):
    """A sequence classifier on the tiny base, head initialised from `seed`."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels, **kw)
