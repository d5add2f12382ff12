"""A scriptable stand-in for the adapter bank, for tests of the HTTP layer that need no model."""
from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving.bank.errors import InputError

FAKE_TASKS = {"sst2": ["negative", "positive"], "topic": ["business", "sport", "tech"], "stsb": None}


@dataclass(frozen=True)
class FakeEmbedding:
    """An embedding task of the fake bank: unit vectors of `dimensions` floats from a hash of the text."""

    dimensions: int = 8


@dataclass(frozen=True)
class FakeTagger:
    """A token-classification task of the fake bank: each capitalised word is an entity, of a type from a hash;
    consecutive capitalised words of one type form one entity."""

    types: tuple[str, ...] = ("PER", "LOC")
    labels: list[str] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "labels", ["O"] + [f"{p}-{t}" for t in self.types for p in "BI"])


# A fake bank of every kind: classification, regression, embedding, token classification.
KIND_TASKS = {"sst2": FAKE_TASKS["sst2"], "stsb": None, "embed": FakeEmbedding(), "ner": FakeTagger()}


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
        return [answer(t, x, known[t], self) for x, t in zip(inputs, tasks)]

    def task_info(self, task):
        if task not in self._tasks:
            raise FakeUnknownTask(task)
        spec = self._tasks[task]
        info = {"name": task, "total_rank": 12, "parameter_count": 1234, "base_model": "fake-base"}
        if isinstance(spec, FakeEmbedding):
            return {**info, "task_type": "embedding", "labels": [], "num_labels": 0, "problem_type": None,
                    "pooling": {"mode": "mean", "normalize": True}, "dimensions": spec.dimensions}
        if isinstance(spec, FakeTagger):
            return {**info, "task_type": "token-classification", "labels": spec.labels,
                    "num_labels": len(spec.labels), "problem_type": "single_label_classification"}
        return {**info, "task_type": "sequence-classification", "labels": spec or [],
                "num_labels": len(spec) if spec else 1,
                "problem_type": "regression" if spec is None else "single_label_classification"}

    def add(self, path):
        with self._lock:
            self._tasks[Path(path).name] = ["no", "yes"]
        return Path(path).name

    def remove(self, task):
        with self._lock:
            if task not in self._tasks:
                raise FakeUnknownTask(task)
            del self._tasks[task]


def answer(task: str, x, labels, bank: FakeBank | None = None) -> dict:
    """The fake's answer for input `x` of `task`, per the task's kind (`labels`: its FAKE_TASKS-style spec)."""
    digest = hashlib.sha256(f"{task}|{x!r}".encode()).digest()
    if isinstance(labels, FakeEmbedding):
        tokens = len(FakeTokenizer()([x])["input_ids"][0])
        return {"task": task, "embedding": unit_vector(digest, labels.dimensions),
                "tokens": min(tokens, bank.max_length) if bank else tokens}
    if isinstance(labels, FakeTagger):
        if not isinstance(x, str):
            raise InputError(f"task {task!r} is a token-classification task: it takes single texts, not pairs")
        return {"task": task, "entities": entities(x, labels.types)}
    if labels is None:
        return {"task": task, "value": digest[0] / 51.0}
    weights = [1 + digest[i] for i in range(len(labels))]
    probs = [w / sum(weights) for w in weights]
    best = max(range(len(labels)), key=probs.__getitem__)
    return {"task": task, "label": labels[best], "score": probs[best], "scores": dict(zip(labels, probs))}


def unit_vector(digest: bytes, dimensions: int) -> list[float]:
    values = [digest[i % len(digest)] - 127.5 for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def entities(text: str, types: tuple[str, ...]) -> list[dict]:
    """Capitalised words as entities with character offsets; neighbours of one type form one entity."""
    runs: list[tuple[str, list]] = []  # (type, [(word match, score), ...])
    previous = None  # the type of the word before, if it was capitalised
    for word in re.finditer(r"\S+", text):
        if not word.group()[0].isupper():
            previous = None
            continue
        digest = hashlib.sha256(word.group().lower().encode()).digest()
        kind, score = types[digest[0] % len(types)], 0.5 + digest[1] / 510
        if kind == previous:
            runs[-1][1].append((word, score))
        else:
            runs.append((kind, [(word, score)]))
        previous = kind
    return [{"entity_group": kind, "score": sum(s for _, s in words) / len(words),
             "word": text[words[0][0].start():words[-1][0].end()], "start": words[0][0].start(),
             "end": words[-1][0].end()} for kind, words in runs]
