"""IncreLoraTrainer: a thin ``Trainer`` subclass that adds what a callback alone cannot do.

- It adds an IncreLoraCallback itself (growth, param groups, regulariser).
- Its scheduler is RestartWarmupScheduler (warmup ``GrowthPlan.warmup_steps``: the config's
  ``warmup_steps``, or derived from the run's length when unset; then linear decay, per group).
- The orthogonality regulariser is added to every training loss, also one the Trainer computes outside
  the model (label smoothing, compute_loss_func).
- Each micro-batch's loss is the model's mean loss; the Trainer divides it by the accumulation steps.
  (transformers 5.x skips that division when it passes ``num_items_in_batch`` to a model that
  accepts ``**kwargs``, which sequence classifiers then ignore.)
- Resume: before the Trainer loads a checkpoint's weights and optimizer, the layers are grown to the
  checkpoint's ranks and the optimizer is regrouped as it was, so both load as saved.
- load_best_model_at_end: the layers are rebuilt to the best checkpoint's ranks before its weights load.

``HeadLearningRate`` (a mixin of every method's trainer) gives the modules trained in full their own
learning rate, a multiple of the adapters'.
"""
from __future__ import annotations

import logging
from pathlib import Path

from transformers import Trainer

from increlora import IncreLoraConfig, RestartWarmupScheduler, distributed, increlora_layers, orth_loss
from increlora.errors import CheckpointError
from increlora.model import config_of
from increlora.schedule import plan_growth

from .callback import IncreLoraCallback
from .checkpoints import STATE_NAME, arrange_param_groups, last_complete_checkpoint, restore_structure, write_state

logger = logging.getLogger(__name__)


# IncreLoRA's and PEFT's adapter factors; every other trainable parameter belongs to the head
ADAPTER_PARAMETERS = ("lora_", "reserve_")


def separate_head_groups(optimizer, model, scale: float) -> None:
    """Move the head's parameters (trainable, not adapter factors) into groups of their own, appended after
    the others, at `scale` times their group's rate: the first group stays an adapter group, which groups
    that IncreLoRA's allocator adds copy."""
    head = {id(p) for n, p in model.named_parameters()
            if p.requires_grad and not any(k in n for k in ADAPTER_PARAMETERS)}
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in head]
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in head]
            hyper = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
            optimizer.add_param_group({**hyper, "params": moved, "lr": group["lr"] * scale})


class HeadLearningRate:
    """Trainer mixin: the modules trained in full learn at `head_lr_scale` times the adapters' rate."""

    def __init__(self, *args, head_lr_scale: float = 1.0, **kwargs):
        self.head_lr_scale = head_lr_scale
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.head_lr_scale != 1.0:
            separate_head_groups(optimizer, self.model if model is None else model, self.head_lr_scale)
        return optimizer


class IncreLoraTrainer(HeadLearningRate, Trainer):
    def __init__(self, *args, increlora_config: IncreLoraConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.increlora_config = config = config_of(self.model, increlora_config, "IncreLoraTrainer")
        _warn_ignored_schedule(self.args, config)
        self.increlora = IncreLoraCallback(config)
        self.increlora.in_increlora_trainer = True
        self.add_callback(self.increlora)
        self.loss_is_scaled_for_ga = False
        self._group_layout: list[dict] | None = None

    @property
    def allocator(self):
        return self.increlora.allocator

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise CheckpointError(f"no complete checkpoint to resume from in {self.args.output_dir}")
        if resume_from_checkpoint:
            self.increlora.allocator, self._group_layout = restore_structure(
                self.model, self.increlora_config, resume_from_checkpoint)
        distributed.exclude_from_ddp(self.model)  # blocks grown or restored since, before the Trainer wraps in DDP
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_best_model(self):
        # The best checkpoint may be from before some growth rounds: rebuild the layers to its
        # structure first, or its weights would load (non-strictly) into a model of other ranks.
        best = self.state.best_model_checkpoint
        if best and not (Path(best) / STATE_NAME).is_file():
            # e.g. a node without shared storage: its weights could not load into the right ranks either
            logger.warning("%s has no %s here; keeping the model as it ended instead of the best one",
                           best, STATE_NAME)
            return
        if best:
            self.increlora.allocator, _ = restore_structure(self.model, self.increlora_config, best)
        super()._load_best_model()

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self._group_layout is not None:
            arrange_param_groups(optimizer, self.model if model is None else model, self._group_layout)
            self._group_layout = None
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            num_modules = sum(1 for _ in increlora_layers(self.model))
            plan = plan_growth(self.increlora_config, num_modules, num_training_steps)
            self.lr_scheduler = RestartWarmupScheduler(optimizer or self.optimizer, plan.warmup_steps,
                                                       num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        # The allocator state goes in before trainer_state.json, the file that marks a checkpoint as
        # complete, and before older checkpoints are deleted. (The callback writes it again on_save.)
        if self.args.should_save and self.allocator is not None:
            write_state(output_dir, self.model, self.optimizer, self.allocator, self.state.global_step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.increlora.orth_pending = False
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
        if self.increlora.orth_pending:  # the loss was computed outside the model: add the regulariser here
            self.increlora.orth_pending = False
            term = self.increlora_config.orth_reg_weight * orth_loss(self.model)
            result = (result[0] + term, result[1]) if return_outputs else result + term
        return result


def _warn_ignored_schedule(args, config: IncreLoraConfig) -> None:
    """IncreLoraTrainer's schedule is its own: say so when the arguments ask for another one."""
    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    ignored = [f"lr_scheduler_type={kind!r}"] if kind != "linear" else []
    if args.lr_scheduler_kwargs:
        ignored.append(f"lr_scheduler_kwargs={args.lr_scheduler_kwargs!r}")
    if args.warmup_steps and args.warmup_steps != config.warmup_steps:
        ignored.append(f"warmup_steps={args.warmup_steps!r}")
    if ignored:
        warmup = "derived from the run" if config.warmup_steps is None else f"{config.warmup_steps} steps"
        logger.warning("IncreLoraTrainer schedules the learning rate itself: a warmup of IncreLoraConfig.warmup_steps "
                       "(%s) for each parameter group as it joins, then linear decay to 0; ignoring %s",
                       warmup, ", ".join(ignored))
