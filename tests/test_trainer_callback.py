"""The Trainer integration against a plain loop: same ranks, same parameters after the same steps."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from increlora import IncreLoraConfig, apply_increlora, orth_loss
from increlora.allocator import RankAllocator
from increlora.checkpoint import trainable_state
from increlora.schedule import RestartWarmupScheduler
from tests.loop import synthetic_batches
from tests.tiny import tiny_classifier
from training import IncreLoraCallback, IncreLoraTrainer
from training.callback import RestartWarmupLambda

STEPS, BATCH, LR = 40, 8, 5e-3


def config(**kw) -> IncreLoraConfig:
    # 12 modules, budget 24: 12 growth rounds at steps 3, 6, ..., 36 spend it and drop the reserves.
    return IncreLoraConfig(init_warmup=2, interval=3, top_h=1, warmup_steps=3, lora_dropout=0.0, orth_reg_weight=0.1,
                           **kw)


def model_for(base, **kw):
    model = tiny_classifier(base, 2, seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return apply_increlora(model, config(**kw))


class Examples(Dataset):
    def __init__(self, micro: int):
        self.rows = [{"input_ids": ids[i], "labels": labels[i]}
                     for ids, labels in synthetic_batches(STEPS, micro, batch=BATCH) for i in range(BATCH)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class SeedBeforeGrowth(TrainerCallback):
    """Growth draws new reserves from the global RNG: seed it the same way in both runs."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        torch.manual_seed(1000 + state.global_step)


def reference(base, micro: int, **kw):
    model = model_for(base, **kw)
    cfg = model.increlora_config
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    sched = RestartWarmupScheduler(opt, cfg.warmup_steps, STEPS)
    alloc = RankAllocator(model, cfg, STEPS)
    batches = synthetic_batches(STEPS, micro, batch=BATCH)
    model.train()
    for step in range(STEPS):
        for m in range(micro):
            ids, labels = batches[step * micro + m]
            loss = model(input_ids=ids, labels=labels).loss + cfg.orth_reg_weight * orth_loss(model)
            (loss / micro).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        torch.manual_seed(1000 + step)
        alloc.step(step, opt, sched)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model, alloc


def args(tmp_path, micro: int, **kw) -> TrainingArguments:
    kw.setdefault("max_steps", STEPS)
    return TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=micro, learning_rate=LR, weight_decay=0.0, warmup_steps=3,
        lr_scheduler_type="linear", max_grad_norm=1.0, train_sampling_strategy="sequential",
        save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, **kw)


def assert_same(model, alloc, ref_model, ref_alloc):
    assert alloc.rank_pattern() == ref_alloc.rank_pattern()
    assert [(e.step, e.module) for e in alloc.history] == [(e.step, e.module) for e in ref_alloc.history]
    assert alloc.total_rank == alloc.budget
    got, want = trainable_state(model), trainable_state(ref_model)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("grow_init", ["paper", "lora"])  # "lora" moves joined reserves between groups
def test_plain_trainer_with_callback_matches_the_loop(tiny_base, tmp_path, grow_init):
    ref_model, ref_alloc = reference(tiny_base, micro=1, grow_init=grow_init)
    model = model_for(tiny_base, grow_init=grow_init)
    callback = IncreLoraCallback()
    trainer = Trainer(model=model, args=args(tmp_path, 1), train_dataset=Examples(1),
                      callbacks=[SeedBeforeGrowth(), callback])
    trainer.train()
    assert len(trainer.optimizer.param_groups) > 2  # grown parameters joined the Trainer's optimizer
    assert_same(model, callback.allocator, ref_model, ref_alloc)


def test_increlora_trainer_with_accumulation_matches_the_loop(tiny_base, tmp_path):
    ref_model, ref_alloc = reference(tiny_base, micro=2)
    model = model_for(tiny_base)
    trainer = IncreLoraTrainer(model=model, args=args(tmp_path, 2), train_dataset=Examples(2),
                               callbacks=[SeedBeforeGrowth()])
    trainer.train()
    assert_same(model, trainer.allocator, ref_model, ref_alloc)


def test_loss_scale_is_read_from_the_accelerate_optimizer():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    from training.callback import loss_scale

    param = torch.nn.Parameter(torch.zeros(2))
    Accelerator(cpu=True)
    try:
        scaled = AcceleratedOptimizer(torch.optim.SGD([param], lr=0.1), device_placement=False,
                                      scaler=torch.amp.GradScaler("cpu", init_scale=512.0))
        unscaled = AcceleratedOptimizer(torch.optim.SGD([param], lr=0.1), device_placement=False)
        assert loss_scale(scaled) == 512.0
        assert loss_scale(unscaled) == 1.0
        assert loss_scale(torch.optim.SGD([param], lr=0.1)) == 1.0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_torchrun_guards_raise_clear_errors(tiny_base):
    from types import SimpleNamespace

    from increlora.errors import ConfigError

    # Nothing but the adapter is trainable: DDP would have no parameter to own.
    model = apply_increlora(tiny_classifier(tiny_base, 2), IncreLoraConfig(modules_to_save=[]))
    with pytest.raises(ConfigError, match="modules_to_save"):
        IncreLoraCallback().on_init_end(SimpleNamespace(world_size=2), None, None, model=model)
    IncreLoraCallback().on_init_end(SimpleNamespace(world_size=1), None, None, model=model)

    # A step whose backward never reached the gradient averaging is refused, not trained apart.
    callback = IncreLoraCallback()
    callback._grad_sync = SimpleNamespace(syncs=3)
    callback._syncs_seen = 3
    with pytest.raises(ConfigError, match="not averaged"):
        callback.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), None)


def checkpointing_args(folder) -> TrainingArguments:
    """4 steps with a checkpoint every 2, on the CPU."""
    return TrainingArguments(output_dir=str(folder), max_steps=4, save_steps=2, per_device_train_batch_size=BATCH,
                             learning_rate=LR, report_to="none", use_cpu=True, disable_tqdm=True)


def test_allocator_state_is_in_a_checkpoint_before_it_is_marked_complete(tiny_base, tmp_path, monkeypatch):
    # trainer_state.json is the last file of a checkpoint; the allocator state must already be there.
    from transformers.trainer_callback import TrainerState

    seen = []
    real = TrainerState.save_to_json
    monkeypatch.setattr(TrainerState, "save_to_json", lambda self, path: seen.append(
        (Path(path).parent / "increlora_state.json").is_file()) or real(self, path))
    args = checkpointing_args(tmp_path)
    IncreLoraTrainer(model=model_for(tiny_base), args=args, train_dataset=Examples(1)).train()
    assert seen == [True, True]


def test_resume_true_skips_a_checkpoint_whose_save_was_cut_short(tiny_base, tmp_path):
    args = checkpointing_args(tmp_path)
    IncreLoraTrainer(model=model_for(tiny_base), args=args, train_dataset=Examples(1)).train()
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()  # killed before the save finished

    class Steps(TrainerCallback):
        done: list = []

        def on_step_end(self, args, state, control, **kwargs):
            self.done.append(state.global_step)

    trainer = IncreLoraTrainer(model=model_for(tiny_base), args=args, train_dataset=Examples(1), callbacks=[Steps()])
    trainer.train(resume_from_checkpoint=True)
    assert Steps.done == [3, 4]  # continued from checkpoint-2


@pytest.mark.parametrize("grow_init, stop", [("paper", 38), ("lora", 38), ("lora", 20)])
def test_resume_after_the_budget_is_spent_ends_with_the_same_adapter(tiny_base, tmp_path, grow_init, stop):
    # the budget is spent at step 36 and the reserves are dropped; resume from step 38 (or mid-growth, 20)
    full = model_for(tiny_base, grow_init=grow_init)
    IncreLoraTrainer(model=full, args=args(tmp_path / "full", 1), train_dataset=Examples(1),
                     callbacks=[SeedBeforeGrowth()]).train()
    saving = dataclasses.replace(args(tmp_path / "part", 1), save_strategy="steps", save_steps=stop)
    IncreLoraTrainer(model=model_for(tiny_base, grow_init=grow_init), args=saving, train_dataset=Examples(1),
                     callbacks=[SeedBeforeGrowth()]).train()
    resumed = model_for(tiny_base, grow_init=grow_init)
    trainer = IncreLoraTrainer(model=resumed, args=saving, train_dataset=Examples(1), callbacks=[SeedBeforeGrowth()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "part" / "run" / f"checkpoint-{stop}"))
    assert trainer.allocator.total_rank == trainer.allocator.budget
    got, want = trainable_state(resumed), trainable_state(full)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)


def test_load_best_model_at_end_restores_the_best_checkpoints_ranks(tiny_base, tmp_path):
    from safetensors.torch import load_file

    from increlora import rank_pattern

    scores = iter(range(100, 0, -1))  # each evaluation scores worse: the first checkpoint is the best
    run = dataclasses.replace(
        args(tmp_path, 1), eval_strategy="steps", eval_steps=8, save_strategy="steps", save_steps=8,
        load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    model = model_for(tiny_base)
    trainer = IncreLoraTrainer(model=model, args=run, train_dataset=Examples(1), eval_dataset=Examples(1),
                               compute_metrics=lambda _: {"score": next(scores)})
    trainer.train()
    best = tmp_path / "run" / "checkpoint-8"
    assert trainer.state.best_model_checkpoint == str(best)
    saved = load_file(str(best / "model.safetensors"))
    assert trainer.allocator.total_rank < trainer.allocator.budget  # as at step 8, before the budget was spent
    assert rank_pattern(model) == trainer.allocator.rank_pattern()
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p.detach(), saved[name], msg=name)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_regulariser_is_added_to_any_training_loss(tiny_base, tmp_path, smoothing, monkeypatch):
    # with label smoothing the Trainer computes the loss itself and the model returns none
    import training.callback
    import training.trainer

    terms = []
    real = training.callback.orth_loss
    spy = lambda model: terms.append(real(model)) or terms[-1]  # noqa: E731
    monkeypatch.setattr(training.callback, "orth_loss", spy)
    monkeypatch.setattr(training.trainer, "orth_loss", spy)
    losses = []  # (the Trainer's loss, IncreLoraTrainer's) per step
    stock = Trainer.compute_loss

    def stock_spy(self, *a, **kw):
        losses.append([stock(self, *a, **kw)])
        return losses[-1][0]

    def ours_spy(self, *a, **kw):
        out = ours(self, *a, **kw)
        losses[-1].append(out)
        return out

    ours = IncreLoraTrainer.compute_loss
    monkeypatch.setattr(Trainer, "compute_loss", stock_spy)
    monkeypatch.setattr(IncreLoraTrainer, "compute_loss", ours_spy)
    run = dataclasses.replace(args(tmp_path, 1), max_steps=3, label_smoothing_factor=smoothing)
    IncreLoraTrainer(model=model_for(tiny_base), args=run, train_dataset=Examples(1)).train()
    assert len(terms) == 3 and len(losses) == 3 and all(t.requires_grad for t in terms)
    weight = config().orth_reg_weight
    for (stock_loss, our_loss), term in zip(losses, terms):
        # without smoothing the model's own loss already holds the term (the callback's hook)
        want = stock_loss + weight * term if smoothing else stock_loss
        torch.testing.assert_close(our_loss.detach(), want.detach())
        assert smoothing == 0 or not torch.allclose(our_loss, stock_loss)


def test_a_plain_trainer_warns_when_it_cannot_add_the_regulariser(tiny_base, tmp_path, caplog):
    run = dataclasses.replace(args(tmp_path, 1), max_steps=2, label_smoothing_factor=0.1)
    Trainer(model=model_for(tiny_base), args=run, train_dataset=Examples(1), callbacks=[IncreLoraCallback()]).train()
    warnings = [r for r in caplog.records if "regulariser was not added" in r.getMessage()]
    assert len(warnings) == 1 and "IncreLoraTrainer" in warnings[0].getMessage()


@pytest.mark.parametrize("changes, warned", [
    ({}, None),  # the arguments of args(): linear, warmup_steps == config().warmup_steps
    ({"lr_scheduler_type": "constant"}, "lr_scheduler_type='constant'"),
    ({"warmup_steps": 10}, "warmup_steps=10"),
])
def test_scheduler_arguments_it_ignores_are_named_in_a_warning(tiny_base, tmp_path, caplog, changes, warned):
    IncreLoraTrainer(model=model_for(tiny_base), args=dataclasses.replace(args(tmp_path, 1), **changes),
                     train_dataset=Examples(1))
    messages = [r.getMessage() for r in caplog.records if "schedules the learning rate itself" in r.getMessage()]
    assert (messages == []) if warned is None else (len(messages) == 1 and warned in messages[0])


def test_a_plain_trainer_refuses_load_best_model_at_end(tiny_base, tmp_path):
    from increlora.errors import ConfigError

    run = dataclasses.replace(args(tmp_path, 1), max_steps=4, eval_strategy="steps", eval_steps=2,
                              save_strategy="steps", save_steps=2, load_best_model_at_end=True)
    trainer = Trainer(model=model_for(tiny_base), args=run, train_dataset=Examples(1), eval_dataset=Examples(1),
                      callbacks=[IncreLoraCallback()])
    with pytest.raises(ConfigError, match="load_best_model_at_end needs IncreLoraTrainer"):
        trainer.train()


def test_load_best_model_at_end_keeps_the_final_model_without_the_best_ones_state(tiny_base, tmp_path, caplog):
    # e.g. a node without shared storage: the weights cannot load into the right ranks, so none load

    class DropState(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            for path in Path(args.output_dir).glob("checkpoint-8/increlora_state.json"):
                if state.global_step > 8:
                    path.unlink()

    scores = iter(range(100, 0, -1))
    run = dataclasses.replace(
        args(tmp_path, 1), eval_strategy="steps", eval_steps=8, save_strategy="steps", save_steps=8,
        load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    model = model_for(tiny_base)
    trainer = IncreLoraTrainer(model=model, args=run, train_dataset=Examples(1), eval_dataset=Examples(1),
                               compute_metrics=lambda _: {"score": next(scores)}, callbacks=[DropState()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-8")
    assert trainer.allocator.total_rank == trainer.allocator.budget  # the model as it ended
    assert any("keeping the model as it ended" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("run", [{"max_steps": 60}, {"max_steps": -1, "num_train_epochs": 2}])
def test_the_trainer_derives_the_schedule_from_the_run(tiny_base, tmp_path, run):
    model = tiny_classifier(tiny_base, 2, seed=0)
    apply_increlora(model, IncreLoraConfig(lora_dropout=0.0))  # schedule fields unset: derived
    trainer = IncreLoraTrainer(model=model, args=args(tmp_path, 1, **run), train_dataset=Examples(1))
    trainer.train()
    steps = trainer.state.max_steps
    assert steps == (60 if run["max_steps"] > 0 else 2 * STEPS)
    plan = trainer.allocator.plan
    assert plan.total_steps == steps and len(plan.derived) == 4
    assert trainer.allocator.total_rank == trainer.allocator.budget == 24
    assert trainer.allocator.history[-1].step <= 0.4 * steps
    assert trainer.lr_scheduler.warmup_steps == plan.warmup_steps
    # the adapter records the schedule it was trained with
    assert model.increlora_config.interval == plan.interval and model.increlora_config.top_h == plan.top_h


def test_a_plain_trainer_restarts_warmup_with_the_derived_length(tiny_base, tmp_path):
    model = tiny_classifier(tiny_base, 2, seed=0)
    apply_increlora(model, IncreLoraConfig(lora_dropout=0.0))
    callback = IncreLoraCallback()
    trainer = Trainer(model=model, args=args(tmp_path, 1), train_dataset=Examples(1), callbacks=[callback])
    trainer.train()
    plan = callback.allocator.plan
    restarted = [fn for fn in trainer.lr_scheduler.lr_lambdas if isinstance(fn, RestartWarmupLambda)]
    assert restarted and all(fn.warmup_steps == plan.warmup_steps != 3 for fn in restarted)
    assert callback.allocator.total_rank == callback.allocator.budget
