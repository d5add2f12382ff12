"""The growth schedule: the authors' growth rule, and the plan derived from the run's length and budget."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from increlora import IncreLoraConfig, RankAllocator, apply_increlora
from increlora.config import CONFIG_VERSION
from increlora.schedule import SCHEDULE_FIELDS, plan_growth
from tests.tiny import tiny_classifier


def original_growth_steps(init_warmup: int, interval: int, total_steps: int) -> list[int]:
    """The rule of the authors' RankAllocator.update_and_increase, written out literally."""
    return [s for s in range(total_steps) if s > init_warmup and s % interval == 0]


@settings(max_examples=200, deadline=None)
@given(init_warmup=st.integers(0, 300), interval=st.integers(1, 60), total=st.integers(1, 800))
def test_growth_steps_follow_the_original_rule(tiny_base, init_warmup, interval, total):
    # a budget too large to be spent, so that every step of the rule is a growth step
    cfg = IncreLoraConfig(init_warmup=init_warmup, interval=interval, top_h=1, target_total_rank=10**6,
                          warmup_steps=1, lora_dropout=0.0)
    alloc = _allocator(tiny_base, cfg, total)
    expected = original_growth_steps(init_warmup, interval, total)
    assert [s for s in range(total) if alloc.is_growth_step(s)] == expected
    for step in range(0, total, 7):
        later = [s for s in expected if s >= step]
        assert alloc.next_growth_step(step) == (later[0] if later else None)



def _allocator(tiny_base, cfg: IncreLoraConfig, total: int) -> RankAllocator:
    model = apply_increlora(tiny_classifier(tiny_base), cfg)
    return RankAllocator(model, cfg, total)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(50, 200_000), modules=st.integers(1, 400), avg=st.sampled_from([1.5, 2.0, 3.0, 4.0, 8.0]),
       add_rank=st.sampled_from([1, 2, 4]), beta1=st.sampled_from([0.5, 0.85, 0.95]))
def test_derived_plan_ends_growth_by_40_percent_and_spends_the_budget(total, modules, avg, add_rank, beta1):
    cfg = IncreLoraConfig(target_avg_rank=avg, add_rank=add_rank, beta1=beta1)
    plan = plan_growth(cfg, modules, total)
    assert set(plan.derived) == set(SCHEDULE_FIELDS)
    needed = plan.budget - plan.start_rank
    assert plan.budget == round(avg * modules)
    # enough rounds to reach the budget, and no round more than needed
    assert plan.rounds == math.ceil(needed / plan.per_round)
    assert plan.reaches_budget
    if plan.steps:
        assert plan.last_growth <= 0.4 * total
        assert list(plan.steps) == original_growth_steps(plan.init_warmup, plan.interval, total)[: plan.rounds]
    # as in the official scripts: init_warmup = interval = warmup_steps
    assert plan.init_warmup == plan.interval == plan.warmup_steps
    assert plan.top_h <= modules


@pytest.mark.parametrize("total", [60, 100, 333, 1000, 5000])
@pytest.mark.parametrize("avg", [1.5, 2.0, 4.0])
def test_the_allocator_reaches_the_budget_exactly_on_a_derived_plan(tiny_base, total, avg):
    cfg = IncreLoraConfig(target_avg_rank=avg, lora_dropout=0.0)
    alloc = _allocator(tiny_base, cfg, total)
    opt = torch.optim.AdamW([p for p in alloc.model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(total):
        alloc.step(step, opt)  # no backward: every score ties, so growth goes by module order
    assert alloc.total_rank == alloc.budget == round(avg * len(alloc.names))
    assert alloc.history[-1].step == alloc.plan.last_growth <= 0.4 * total
    assert sorted({e.step for e in alloc.history}) == list(alloc.plan.steps)
    # the run's config has the schedule filled in, and the model records it for save_adapter
    assert alloc.config.interval == alloc.plan.interval and alloc.model.increlora_config is alloc.config


def test_the_official_sst2_schedule_is_reproduced():
    # SST-2 with DeBERTaV3-base in the authors' script: 72 modules, rank 2, 24 epochs x 2,105 steps;
    # init_warmup = interval = warmup 1000, top_h 5, so 15 rounds ending at step 16,000 (32%).
    plan = plan_growth(IncreLoraConfig(target_avg_rank=2), 72, 24 * 2105)
    assert plan.top_h == 5 and plan.rounds == 15
    assert 0.9 * 1000 <= plan.interval <= 1.1 * 1000
    assert 0.3 <= plan.last_growth / plan.total_steps <= 0.34


def test_a_short_run_with_the_old_defaults_now_spends_its_budget():
    # 600 steps on MiniLM-L6 (36 modules): init_warmup 200, interval 10, top_h 1 ended growth at 560
    plan = plan_growth(IncreLoraConfig(), 36, 600)
    assert plan.reaches_budget and plan.last_growth <= 240
    assert plan.interval >= IncreLoraConfig().effective_score_window  # score windows do not overlap


def test_values_the_user_gives_win_and_the_rest_is_derived():
    cfg = IncreLoraConfig(interval=50)
    plan = plan_growth(cfg, 36, 3000)
    assert plan.interval == 50 and plan.derived == ("init_warmup", "top_h", "warmup_steps")
    assert plan.init_warmup == 50 and plan.reaches_budget and plan.last_growth <= 1000
    plan = plan_growth(IncreLoraConfig(top_h=2), 36, 3000)
    assert plan.top_h == 2 and plan.rounds == 18 and plan.last_growth <= 1000
    given_all = dict(init_warmup=7, interval=3, top_h=4, warmup_steps=11)
    plan = plan_growth(IncreLoraConfig(**given_all), 36, 3000)
    assert plan.derived == () and {f: getattr(plan, f) for f in SCHEDULE_FIELDS} == given_all
    assert plan.steps[:2] == (9, 12)


def test_an_unreachable_budget_with_the_users_values_is_a_warning(tiny_base, caplog):
    cfg = IncreLoraConfig(init_warmup=90, interval=5, top_h=1, lora_dropout=0.0)  # 2 rounds of 12 needed
    with caplog.at_level("WARNING", logger="increlora.allocator"):
        alloc = _allocator(tiny_base, cfg, 100)
    assert not alloc.plan.reaches_budget
    assert "below the budget 24" in caplog.text


def test_describe_names_the_growth_steps_and_what_was_derived():
    text = plan_growth(IncreLoraConfig(top_h=4), 36, 1000).describe()
    assert "72" in text and "derived from the run: init_warmup, interval, warmup_steps" in text
    assert "rounds of up to 4 components" in text


def test_a_version_1_config_keeps_its_meaning():
    old = {**IncreLoraConfig(init_warmup=200, interval=10, top_h=1, warmup_steps=100).to_dict(),
           "orth_reg_weight": 0.1}
    del old["config_version"]
    cfg = IncreLoraConfig.from_dict(old)
    assert cfg.orth_reg_weight == pytest.approx(0.2)  # version 1 divided by modules, not 2 x modules
    # version 1 grew at 200, 210, ...: the same steps under the authors' rule
    assert original_growth_steps(cfg.init_warmup, cfg.interval, 230) == [200, 210, 220]
    new = IncreLoraConfig(orth_reg_weight=0.1, init_warmup=200, interval=10)
    assert new.to_dict()["config_version"] == CONFIG_VERSION
    assert IncreLoraConfig.from_dict(new.to_dict()) == new
    with pytest.raises(Exception, match="config_version 99"):
        IncreLoraConfig.from_dict({**new.to_dict(), "config_version": 99})


def test_a_config_written_before_init_defaulted_to_lora_keeps_the_paper_start():
    assert IncreLoraConfig().init == "lora"
    written = IncreLoraConfig().to_dict()
    del written["init"]  # as written before the field existed
    for version in (1, 2):
        assert IncreLoraConfig.from_dict({**written, "config_version": version}).init == "paper"
        assert IncreLoraConfig.from_dict({**written, "config_version": version, "init": "lora"}).init == "lora"
    assert IncreLoraConfig.from_dict(IncreLoraConfig(init="paper").to_dict()).init == "paper"


def test_a_config_written_before_grow_init_existed_reads_as_the_authors_growth():
    written = IncreLoraConfig().to_dict()
    del written["grow_init"]
    for version in (1, 2, 3):
        assert IncreLoraConfig.from_dict({**written, "config_version": version}).grow_init == "paper"
    assert IncreLoraConfig.from_dict(IncreLoraConfig(grow_init="lora").to_dict()).grow_init == "lora"
