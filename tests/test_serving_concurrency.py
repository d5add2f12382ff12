"""add/remove while predictions run in other threads: every answer is right or a clean UnknownTaskError."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from serving import AdapterBank, UnknownTaskError
from tests.helpers.adapters import adapter_set, make_adapter

TEXTS = ["great film", ("a good plot", "the story"), "bad movie", "hello world", "win a prize now", ""]
STABLE = ["sst2", "topic", "stsb", "tags"]


@pytest.fixture(scope="module")
def folders(tiny_base, tmp_path_factory):
    adapters = adapter_set(tiny_base, tmp_path_factory.mktemp("adapters"))
    extra = tmp_path_factory.mktemp("extra")
    make_adapter(tiny_base, extra, "flux", 3, seed=77, max_rank=5)
    return adapters, extra / "flux"


def test_add_remove_concurrent_with_predictions(folders):
    adapters, flux = folders
    bank = AdapterBank.load([adapters / t for t in STABLE], dtype="float32")
    bank.add(flux)
    expected = {(t, x): row for t in [*STABLE, "flux"] for x, row in zip(TEXTS, bank.logits(TEXTS, t))}
    bank.remove("flux")
    stop = threading.Event()
    failures: list[str] = []
    counts = {"ok": 0, "unknown": 0, "churn": 0}
    lock = threading.Lock()

    def predictor(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            idx = [rng.randrange(len(TEXTS)) for _ in range(rng.randint(1, 6))]
            tasks = [rng.choice([*STABLE, "flux"]) for _ in idx]
            try:
                got = bank.logits([TEXTS[i] for i in idx], tasks)
            except UnknownTaskError as exc:
                if exc.task != "flux":
                    failures.append(f"unexpected unknown task {exc.task}")
                with lock:
                    counts["unknown"] += 1
                continue
            for i, t, row in zip(idx, tasks, got):
                if not torch.allclose(row, expected[t, TEXTS[i]], atol=1e-5, rtol=1e-5):
                    failures.append(f"wrong answer for {t} {TEXTS[i]!r}")
            with lock:
                counts["ok"] += 1

    def churner() -> None:
        while not stop.is_set():
            bank.add(flux)
            time.sleep(0.002)
            bank.remove("flux")
            with lock:
                counts["churn"] += 1

    threads = [threading.Thread(target=predictor, args=(s,)) for s in range(3)] + [threading.Thread(target=churner)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(10)
    assert not failures, failures[:5]
    assert counts["ok"] > 20 and counts["churn"] > 5, counts
    assert sorted(bank.tasks) == sorted(STABLE)


def test_a_batch_keeps_the_tasks_it_started_with(folders):
    """A task removed while a batch runs still answers that batch (it holds the old snapshot)."""
    adapters, _ = folders
    bank = AdapterBank.load([adapters / "sst2", adapters / "topic"], dtype="float32")
    want = bank.logits(TEXTS, "topic")
    entered, release = threading.Event(), threading.Event()
    pooler = bank.model.bert.pooler  # a MultiHead: runs inside the forward, after the snapshot is taken
    original = pooler.forward

    def slow_forward(*args, **kwargs):
        entered.set()
        assert release.wait(10)
        return original(*args, **kwargs)

    pooler.forward = slow_forward
    result: list = []
    worker = threading.Thread(target=lambda: result.append(bank.logits(TEXTS, "topic")))
    worker.start()
    assert entered.wait(10)
    bank.remove("topic")
    release.set()
    worker.join(10)
    pooler.forward = original
    for a, b in zip(result[0], want):
        torch.testing.assert_close(a, b)
    with pytest.raises(UnknownTaskError):
        bank.logits(TEXTS, "topic")
