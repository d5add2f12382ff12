"""The Trainer integration against a plain loop: same ranks, same parameters after the same steps."""
from __future__ import annotations

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

STEPS, BATCH, LR = 40, 8, 5e-3


def config() -> IncreLoraConfig:
    # 12 modules, budget 24: 12 growth rounds at steps 4, 7, ..., 37 spend it and drop the reserves.
    return IncreLoraConfig(init_warmup=4, interval=3, warmup_steps=3, lora_dropout=0.0, orth_reg_weight=0.1)


def model_for(base):
    model = tiny_classifier(base, 2, seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return apply_increlora(model, config())


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


def reference(base, micro: int):
    model = model_for(base)
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
    return TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=BATCH,
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


def test_plain_trainer_with_callback_matches_the_loop(tiny_base, tmp_path):
    ref_model, ref_alloc = reference(tiny_base, micro=1)
    model = model_for(tiny_base)
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
