"""The quality benchmark's replay of windowed scoring (benchmarks/scoring_shadow.py) on a real Trainer run."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import Trainer

from increlora import IncreLoraConfig, apply_increlora
from increlora.allocator import choose_modules
from increlora.errors import ConfigError
from tests.test_trainer_callback import Examples, SeedBeforeGrowth, args
from tests.tiny import tiny_classifier
from training import IncreLoraCallback

STEPS = 40


@pytest.fixture
def shadow_class(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from scoring_shadow import WindowedShadow

    return WindowedShadow


def test_the_replay_makes_the_run_s_own_growth_decisions(tiny_base, tmp_path, shadow_class):
    # schedule fields left unset: the plan derives top_h, and the replay must use the derived value
    config = IncreLoraConfig(score_every_step=True, score_window=3, lora_dropout=0.0, orth_reg_weight=0.1)
    model = apply_increlora(tiny_classifier(tiny_base, 2, seed=0, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0), config)
    shadow, callback = shadow_class(), IncreLoraCallback()
    trainer = Trainer(model=model, args=args(tmp_path, 1, max_steps=STEPS), train_dataset=Examples(1),
                      callbacks=[SeedBeforeGrowth(), shadow, callback])
    trainer.train()
    plan = callback.allocator.plan
    assert plan.top_h > 1 and len(plan.steps) > 1  # rounds of several modules: "all modules" would differ
    summary = shadow.summary()
    grown_steps = sorted({e.step for e in callback.allocator.history})
    assert [d["step"] for d in summary["details"]] == grown_steps
    assert summary["replay_mismatches"] == 0
    for d in summary["details"]:
        assert 1 <= len(d["every"]) <= plan.top_h and 1 <= len(d["windowed"]) <= plan.top_h
        grown = sorted(e.module for e in callback.allocator.history if e.step == d["step"])
        assert d["every"] == grown
    assert summary["decisions"] == len(grown_steps) and 0 <= summary["identical"] <= summary["decisions"]


@pytest.mark.parametrize("top_h", [None, 0, 2.0])
def test_choose_modules_refuses_a_top_h_that_is_not_a_count(top_h):
    with pytest.raises(ConfigError, match="top_h"):
        choose_modules({"a": 1.0, "b": 2.0}, ["a", "b"], top_h, 1, 2)


def test_choose_modules_takes_the_best_and_stops_at_the_budget():
    scores = {"a": 1.0, "b": 3.0, "c": 3.0, "d": 2.0}
    assert choose_modules(scores, list(scores), 3, 1, 10) == [("b", 1), ("c", 1), ("d", 1)]
    assert choose_modules(scores, list(scores), 3, 2, 3) == [("b", 2), ("c", 1)]
