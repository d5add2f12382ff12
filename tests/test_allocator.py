import math

import pytest
import torch
from torch import nn

from increlora import IncreLoraConfig, IncreLoraLinear, RankAllocator, RestartWarmupScheduler, apply_increlora
from increlora.importance import ImportanceTracker, sensitivity
from increlora.schedule import restart_warmup_factor
from tests.loop import build, synthetic_batches, train
from tests.tiny import tiny_classifier

QUICK = dict(init_warmup=3, interval=2, warmup_steps=2, lora_dropout=0.0)  # growth at 4, 6, ...


def test_sensitivity_matches_autograd_on_dense_update():
    torch.manual_seed(0)
    layer = IncreLoraLinear(nn.Linear(5, 4), IncreLoraConfig(advance_learning=False, lora_dropout=0.0))
    layer.add_block(2)
    with torch.no_grad():
        layer.lora_E[0].copy_(torch.tensor([0.7, -1.3]))
    layer.train()
    layer.capture_grad = True
    x, c = torch.randn(3, 7, 5), torch.randn(4)
    (layer(x) * c).sum().backward()
    # Reference: make dW a leaf and differentiate the same loss with respect to it.
    dw = layer.delta_weight().detach().requires_grad_(True)
    y = layer.base_layer(x) + x @ dw.t()
    (grad,) = torch.autograd.grad((y * c).sum(), dw)
    expected = (dw.detach() * grad).abs().sum().item() / math.sqrt(20)
    assert sensitivity(layer) == pytest.approx(expected, rel=1e-5)


def test_importance_smoothing_by_hand():
    tr = ImportanceTracker(["m"], beta1=0.5, beta2=0.5)
    tr.update("m", 4.0)  # I = 2, U = 0.5 * |4 - 2| = 1
    assert (tr.ipt["m"], tr.unc["m"], tr.score("m")) == (2.0, 1.0, 2.0)
    tr.update("m", 0.0)  # I = 1, U = 0.5 + 0.5 * 1 = 1
    assert (tr.ipt["m"], tr.unc["m"]) == (1.0, 1.0)


def test_restart_warmup_factor_by_hand():
    # warmup 4, total 20, group started at 10: 0, .25, .5, .75 then (20 - t) / 6
    assert [restart_warmup_factor(t, 10, 4, 20) for t in (9, 10, 12, 14, 17, 20)] == [0.0, 0.0, 0.5, 1.0, 0.5, 0.0]
    assert restart_warmup_factor(3, 0, 0, 6) == 0.5


@pytest.mark.parametrize("budget, expected_added", [(19, [2, 2, 2, 1]), (18, [2, 2, 2]), (25, [2, 2, 2, 2, 2, 2, 1])])
def test_budget_is_never_exceeded_under_ties_and_add_rank(tiny_base, budget, expected_added):
    # All scores tie (the allocator is stepped without any backward); 12 modules start at rank 1,
    # add_rank 2, top_h 5: the last round gets fewer components or fewer modules.
    cfg = IncreLoraConfig(target_total_rank=budget, add_rank=2, top_h=5, init_warmup=0, interval=1,
                          warmup_steps=2, lora_dropout=0.0)
    model = apply_increlora(tiny_classifier(tiny_base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    alloc = RankAllocator(model, cfg, total_steps=10)
    totals = []
    for step in range(10):
        alloc.step(step, opt)
        totals.append(alloc.total_rank)
    assert max(totals) == budget and totals[-1] == budget
    assert [e.added for e in alloc.history] == expected_added
    # ties are broken by module order, round after round
    names = alloc.names
    assert [e.module for e in alloc.history] == (names[:5] + names)[: len(expected_added)]
    assert alloc.finished
    layers = [m for m in model.modules() if isinstance(m, IncreLoraLinear)]
    assert all(not layer.reserves_enabled and not layer.reserve_A.requires_grad for layer in layers)
    assert not any(layer.capture_grad for layer in layers)  # scoring stops at the budget


def test_growth_adds_param_groups_with_restarted_warmup(tiny_base):
    cfg = IncreLoraConfig(target_total_rank=14, top_h=1, **QUICK)
    model, opt, sched, alloc, lrs = train(tiny_base, cfg, 12)
    # growth at steps 4 and 6: two new groups, each starting at its step
    assert [e.step for e in alloc.history] == [4, 6]
    assert [g["increlora_start"] for g in opt.param_groups] == [0, 4, 6]
    grown = alloc.history[0].module
    layer = model.get_submodule(grown)
    group1 = {id(p) for p in opt.param_groups[1]["params"]}
    fresh_reserve = layer.lora_A[2] if layer.active_rank == 3 else layer.reserve_A  # promoted again at 6?
    assert id(layer.lora_E[1]) in group1 and id(fresh_reserve) in group1  # new e, fresh reserves
    assert id(layer.lora_A[1]) not in group1  # promoted reserve keeps its old group
    base_lr = opt.param_groups[0]["initial_lr"]
    for step, row in enumerate(lrs):
        expected = [base_lr * restart_warmup_factor(step, s, 2, 12) for s in (0, 4, 6)][: len(row)]
        assert row == pytest.approx(expected)


def test_grow_init_lora_restarts_joined_reserves_in_the_new_group(tiny_base):
    cfg = IncreLoraConfig(target_total_rank=14, top_h=1, grow_init="lora", **QUICK)
    model, opt, sched, alloc = build(tiny_base, cfg, total_steps=12)
    batches = synthetic_batches(5)
    model.train()
    for step, (ids, labels) in enumerate(batches):  # steps 0..4: growth at 4
        model(input_ids=ids, labels=labels).loss.backward()
        reserves = {n: (alloc.layers[n].reserve_A, alloc.layers[n].reserve_B) for n in alloc.names}
        if step == 4:  # advance learning gave every reserve Adam moments
            assert all(opt.state[p] for pair in reserves.values() for p in pair)
        alloc.step(step, opt, sched)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    grown = alloc.history[0].module
    a, b = alloc.layers[grown].lora_A[1], alloc.layers[grown].lora_B[1]
    assert a is reserves[grown][0] and b is reserves[grown][1]
    assert [g["increlora_start"] for g in opt.param_groups] == [0, 4]
    assert [i for i, g in enumerate(opt.param_groups) for p in g["params"] if p is a or p is b] == [1, 1]
    # skipped at the growth step (no gradient), so no moments yet: Adam starts them over at the next step
    assert a not in opt.state and b not in opt.state and torch.all(b == 0)


def test_without_restart_warmup_new_groups_follow_the_global_schedule(tiny_base):
    cfg = IncreLoraConfig(target_total_rank=13, restart_warmup=False, **QUICK)
    model, opt, sched, alloc, lrs = train(tiny_base, cfg, 8)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["increlora_start"] == 0
    assert lrs[5][1] == pytest.approx(lrs[5][0])


def scoring_setup(tiny_base, cfg):
    """A model in training mode whose updates are non-zero (e = 0.5), so every module has a score."""
    model, opt, sched, alloc = build(tiny_base, cfg, total_steps=4, seed=0, dropout=0.0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, IncreLoraLinear):
                layer.lora_E[0].fill_(0.5)
    return model.train(), opt, sched, alloc


def test_gradient_accumulation_sums_micro_batches(tiny_base):
    cfg = IncreLoraConfig(target_total_rank=14, score_every_step=True, **QUICK)
    scores = []
    for micro, batch in ((1, 8), (2, 4)):
        model, opt, sched, alloc = scoring_setup(tiny_base, cfg)
        full = synthetic_batches(1, 1, batch=8)[0]
        for m in range(micro):
            ids, labels = (t[m * batch:(m + 1) * batch] for t in full)
            (model(input_ids=ids, labels=labels).loss / micro).backward()
        alloc.step(0, opt, sched)
        scores.append(alloc.tracker.ipt)
    for name in scores[0]:
        assert scores[1][name] == pytest.approx(scores[0][name], rel=1e-4)
    assert max(scores[0].values()) > 0


def test_sparse_scoring_picks_the_same_modules_as_every_step(tiny_base):
    common = dict(target_avg_rank=2.0, top_h=2, init_warmup=40, interval=10, warmup_steps=5, lora_dropout=0.0)
    runs = {}
    for every in (True, False):
        cfg = IncreLoraConfig(score_every_step=every, **common)
        _, _, _, alloc, _ = train(tiny_base, cfg, 110)
        runs[every] = alloc
    dense, sparse = runs[True], runs[False]
    assert [e.module for e in dense.history] == [e.module for e in sparse.history]
    assert len(dense.history) == 12
    assert sparse.scored_steps < dense.scored_steps


def test_no_dense_update_outside_scoring_steps(tiny_base, monkeypatch):
    cfg = IncreLoraConfig(target_total_rank=14, init_warmup=49, interval=10, lora_dropout=0.0)  # growth at 50
    model, opt, sched, alloc = build(tiny_base, cfg, total_steps=100)
    calls = []
    monkeypatch.setattr(IncreLoraLinear, "delta_weight", lambda self, *a, **k: calls.append(1))
    model.train()
    ids, labels = synthetic_batches(1)[0]
    model(input_ids=ids, labels=labels).loss.backward()
    alloc.step(0, opt, sched)
    layers = [m for m in model.modules() if isinstance(m, IncreLoraLinear)]
    assert calls == [] and all(layer.grad_acc is None for layer in layers)
    assert not alloc.is_scoring_step(0) and alloc.is_scoring_step(50 - cfg.effective_score_window + 1)


def test_allocator_needs_steps_and_layers(tiny_base):
    with pytest.raises(ValueError, match="total_steps"):
        RankAllocator(apply_increlora(tiny_classifier(tiny_base), IncreLoraConfig()), total_steps=0)
    with pytest.raises(ValueError, match="apply_increlora"):
        RankAllocator(tiny_classifier(tiny_base), IncreLoraConfig(), total_steps=5)
    with pytest.raises(ValueError, match="total_steps"):
        RestartWarmupScheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 1, 0)


def test_fp16_loss_scale_is_divided_out_and_overflowed_steps_are_not_scored(tiny_base):
    cfg = IncreLoraConfig(target_total_rank=14, score_every_step=True, **QUICK)
    ids, labels = synthetic_batches(1)[0]
    trackers = []
    for scale in (1.0, 1024.0):
        model, opt, sched, alloc = scoring_setup(tiny_base, cfg)
        (model(input_ids=ids, labels=labels).loss * scale).backward()
        alloc.step(0, opt, sched, loss_scale=scale)
        trackers.append(alloc)
    plain, scaled = trackers
    assert max(plain.tracker.ipt.values()) > 0
    for name, value in plain.tracker.ipt.items():
        assert scaled.tracker.ipt[name] == pytest.approx(value, rel=1e-5)

    # An overflowed step (inf in one module's captured gradient) leaves the scores as they were.
    before = dict(scaled.tracker.ipt), scaled.scored_steps
    layer = next(m for m in scaled.layers.values())
    layer.grad_acc = torch.full((layer.out_features, layer.in_features), float("inf"))
    scaled.step(1, None, None, loss_scale=2048.0)
    assert (dict(scaled.tracker.ipt), scaled.scored_steps) == before
