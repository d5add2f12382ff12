"""Helpers of the HTTP tests (a scriptable fake bank, tiny real adapters), and tests that they behave."""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

FAKE_TASKS = {"sst2": ["negative", "positive"], "topic": ["business", "sport", "tech"], "stsb": None}


class FakeTokenizer:
    """Counts whitespace words, plus [CLS]/[SEP] (and one more [SEP] per pair), like a BERT tokenizer."""

    def __call__(self, texts, pairs=None, truncation=False, verbose=True, **kw):
        pairs = pairs or [None] * len(texts)
        return {"input_ids": [[0] * (2 + len(t.split()) + (1 + len(p.split()) if p else 0))
                              for t, p in zip(texts, pairs)]}


class FakeUnknownTask(KeyError):
    pass


class FakeBank:
    """The AdapterBank interface with answers computed from a hash of (task, input); records its calls.

    `gate` (a threading.Event), when set up, blocks predict until released; `fail_on` texts make it raise.
    """

    def __init__(self, tasks: dict | None = None, max_length: int = 16):
        self._tasks = dict(FAKE_TASKS if tasks is None else tasks)
        self.max_length = max_length
        self.tokenizer = FakeTokenizer()
        self.calls: list[tuple[list, list]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail_on: set[str] = set()
        self.delay = 0.0
        self._lock = threading.Lock()

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def predict(self, inputs, tasks):
        assert len(inputs) == len(tasks)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never released"
        time.sleep(self.delay)
        with self._lock:
            self.calls.append((list(inputs), list(tasks)))
            known = dict(self._tasks)
        for x, t in zip(inputs, tasks):
            if t not in known:
                raise FakeUnknownTask(t)
            if (x if isinstance(x, str) else x[0]) in self.fail_on:
                raise ValueError(f"cannot predict {x!r}")
        return [answer(t, x, known[t]) for x, t in zip(inputs, tasks)]

    def task_info(self, task):
        if task not in self._tasks:
            raise FakeUnknownTask(task)
        labels = self._tasks[task]
        return {"name": task, "labels": labels or [], "problem_type": "regression" if labels is None
                else "single_label_classification", "total_rank": 12, "parameter_count": 1234,
                "base_model": "fake-base"}

    def add(self, path):
        with self._lock:
            self._tasks[Path(path).name] = ["no", "yes"]

    def remove(self, task):
        with self._lock:
            if task not in self._tasks:
                raise FakeUnknownTask(task)
            del self._tasks[task]


def answer(task: str, x, labels: list[str] | None) -> dict:
    digest = hashlib.sha256(f"{task}|{x!r}".encode()).digest()
    if labels is None:
        return {"task": task, "value": digest[0] / 51.0}
    weights = [1 + digest[i] for i in range(len(labels))]
    probs = [w / sum(weights) for w in weights]
    best = max(range(len(labels)), key=probs.__getitem__)
    return {"task": task, "label": labels[best], "score": probs[best], "scores": dict(zip(labels, probs))}


def make_http_base(folder: Path) -> Path:
    """tests.tiny's base with a tokenizer that knows its words: under transformers 5 the one make_tiny_base
    saves (BertTokenizerFast(vocab_file=...)) maps every word to [UNK], so all texts of one length would
    get the same answer and a swapped answer would go unseen."""
    from transformers import BertTokenizerFast

    from tests.tiny import _vocab, make_tiny_base

    folder = make_tiny_base(folder, seed=0)
    kw = dict(do_lower_case=True, model_max_length=64)
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), **kw)
    if tokenizer.convert_tokens_to_ids("good") == tokenizer.unk_token_id:
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(_vocab())}, **kw)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def http_base(tmp_path_factory) -> Path:
    """Folder of the tiny base model with a working tokenizer (see make_http_base)."""
    return make_http_base(tmp_path_factory.mktemp("http_base"))


def make_tiny_adapters(folder: Path, base_dir: Path, tasks: dict[str, int]) -> Path:
    """Adapter folders `folder/<task>` on the tiny base, with random non-zero low-rank updates and strong heads."""
    import torch

    from increlora import IncreLoraConfig, apply_increlora, save_adapter
    from tests.tiny import tiny_classifier

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


# --- the helpers' own tests -----------------------------------------------------------------------

def test_fake_bank_answers_depend_on_task_and_input():
    bank = FakeBank()
    a, b, c = bank.predict(["x", "x", ("x", "y")], ["sst2", "topic", "sst2"])
    assert a["task"] == "sst2" and set(a["scores"]) == {"negative", "positive"}
    assert abs(sum(a["scores"].values()) - 1) < 1e-9 and a["score"] == max(a["scores"].values())
    assert set(b["scores"]) == {"business", "sport", "tech"}
    assert a["scores"] != c["scores"]
    with pytest.raises(KeyError):
        bank.predict(["x"], ["nope"])


def test_the_http_base_tokenizes_words_and_its_adapters_differ_per_task(tmp_path, http_base):
    from transformers import AutoTokenizer

    from increlora.adapter_file import read_adapter

    ids = AutoTokenizer.from_pretrained(str(http_base))("good film")["input_ids"]
    assert len(ids) == 4 and AutoTokenizer.from_pretrained(str(http_base)).unk_token_id not in ids
    make_tiny_adapters(tmp_path, http_base, {"one": 2, "two": 2})
    one, two = read_adapter(tmp_path / "one"), read_adapter(tmp_path / "two")
    assert one.task == "one" and one.labels == ["one_0", "one_1"]
    name = next(iter(one.modules))
    assert not one.modules[name].E.eq(two.modules[name].E).all()
    assert one.modules[name].E.abs().sum() > 0
