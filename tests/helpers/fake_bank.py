"""A scriptable stand-in for the adapter bank, for tests of the HTTP layer that need no model."""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

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
        return Path(path).name

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
