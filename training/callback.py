"""IncreLoraCallback: IncreLoRA inside a stock Hugging Face ``Trainer``.

Add it to a Trainer whose model went through ``apply_increlora``; nothing else is called by hand:

- on_init_end: excludes the adapter's tensors from the DDP wrapper the Trainer builds later.
- on_train_begin: creates the RankAllocator for ``state.max_steps`` (its GrowthPlan derives the
  schedule fields left unset in the config from that, and is logged) and hooks the orthogonality
  regulariser into the model's forward (training mode only, so evaluation losses stay pure). Under
  torchrun it also starts the replicas from rank 0's adapter and averages adapter gradients after
  every backward pass (``increlora.distributed``), so N processes train like one with N times the batch.
- on_pre_optimizer_step (after backward and gradient clipping, before ``optimizer.step()``):
  ``RankAllocator.step`` scores and grows; grown parameters join the Trainer's own optimizer as new
  param groups, and a stock ``LambdaLR`` gets a restart-warmup factor for each of them.
- on_save: writes the allocator state and the optimizer's groups by parameter name into the
  checkpoint folder (``training.checkpoints``), which ``IncreLoraTrainer`` reads back to resume.
"""
from __future__ import annotations

import logging
from pathlib import Path

from accelerate.state import GradientState
from torch import nn
from transformers import TrainerCallback

from increlora import IncreLoraConfig, RestartWarmupScheduler, distributed, orth_loss
from increlora.allocator import RankAllocator
from increlora.errors import CheckpointError, ConfigError
from increlora.model import config_of
from increlora.schedule import START_KEY, restart_warmup_factor

from .checkpoints import write_state

logger = logging.getLogger(__name__)

class RestartWarmupLambda:
    """LambdaLR factor of a group added at `start`; a callable object so LambdaLR can save it."""

    def __init__(self, start: int, warmup_steps: int, total_steps: int):
        self.start, self.warmup_steps, self.total_steps = start, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        return restart_warmup_factor(step, self.start, self.warmup_steps, self.total_steps)


class IncreLoraCallback(TrainerCallback):
    def __init__(self, config: IncreLoraConfig | None = None):
        self.config = config
        self.allocator: RankAllocator | None = None
        self._hook = None
        self._grad_sync: distributed.GradientSync | None = None
        self._syncs_seen = 0
        # a training forward whose model returned no loss (the Trainer computes it: label smoothing,
        # compute_loss_func): the regulariser could not be added there; IncreLoraTrainer adds it after
        self.orth_pending = False
        self._warned_no_loss = False
        self.in_increlora_trainer = False  # set by IncreLoraTrainer, which rebuilds ranks before loading

    # -- training ----------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and getattr(model, "increlora_config", None) is not None:
            distributed.exclude_from_ddp(model)  # the Trainer wraps the model in DDP later, in train()
            if args.world_size > 1 and not _ddp_owned_parameters(model):
                raise ConfigError("IncreLoRA under torchrun needs a trainable module besides the adapter for "
                                  "DistributedDataParallel to own (modules_to_save, e.g. the classifier); "
                                  "this model has none")

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.config = config = config_of(model, self.config, "IncreLoraCallback")
        if args.load_best_model_at_end and not self.in_increlora_trainer:
            raise ConfigError("load_best_model_at_end needs IncreLoraTrainer: the best checkpoint may have other "
                              "ranks than the model at the end, and a plain Trainer would load its weights into "
                              "the wrong structure")
        if args.n_gpu > 1:
            # DataParallel copies the layers on every forward; growth and scores live on the copies.
            raise ConfigError("IncreLoRA does not support torch.nn.DataParallel (several GPUs driven by one "
                              "process); launch one process per GPU instead: torchrun --nproc_per_node N ...")
        if distributed.is_distributed():
            distributed.check_ddp_exclusion(model)
            distributed.broadcast_adapter(model)
            if self._grad_sync is None:
                # averaged once per optimizer step, on the micro-batch where DDP syncs too
                self._grad_sync = distributed.GradientSync(model, should_sync=lambda: GradientState().sync_gradients)
                self._syncs_seen = 0
        if self.allocator is None:
            self.allocator = RankAllocator(model, config, state.max_steps)
            log = logger.info if self.allocator.plan.derived else logger.debug
            log("%s", self.allocator.plan.describe())
        elif self.allocator.total_steps != state.max_steps:
            raise CheckpointError(
                f"the checkpoint was for a run of {self.allocator.total_steps} steps, this run has "
                f"{state.max_steps}; resume with the same steps/epochs, batch size and data")
        self.config = config = self.allocator.config  # the schedule filled in
        if self._hook is None and config.orth_reg_weight > 0:
            self._hook = model.register_forward_hook(self._add_orth_loss)
        self._schedule_new_groups(optimizer, lr_scheduler)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self._grad_sync is not None:
            if self._grad_sync.syncs == self._syncs_seen:  # the same on every replica: all raise, none hangs
                raise ConfigError("IncreLoRA under torchrun: this step's adapter gradients were not averaged over "
                                  "the processes; the loss must be computed from the model's output tensors")
            self._syncs_seen = self._grad_sync.syncs
        events = self.allocator.step(state.global_step, optimizer, lr_scheduler, loss_scale=loss_scale(optimizer))
        self._schedule_new_groups(optimizer, lr_scheduler)
        for e in events:
            logger.debug("step %d: %s grows to rank %d (score %.3g)", e.step, e.module, e.new_rank, e.score)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._grad_sync is not None:
            self._grad_sync.remove()
            self._grad_sync = None

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.should_save:  # where the Trainer writes its checkpoint (one process, or one per node)
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_state(folder, model, optimizer, self.allocator, state.global_step)

    # -- pieces ------------------------------------------------------------------------------
    def _add_orth_loss(self, module: nn.Module, inputs, output):
        if not module.training:
            return output
        loss = getattr(output, "loss", None)
        if loss is not None:
            output.loss = loss + self.config.orth_reg_weight * orth_loss(module)
        else:
            self.orth_pending = True
        return output

    def on_step_end(self, args, state, control, **kwargs):
        if self.orth_pending and not self._warned_no_loss:
            # only a plain Trainer gets here with it set: IncreLoraTrainer clears it as it adds the term
            logger.warning("the model returned no loss (the Trainer computes it: label smoothing or "
                           "compute_loss_func?), so the orthogonality regulariser was not added; use "
                           "IncreLoraTrainer, which adds it to any loss")
            self._warned_no_loss = True
        self.orth_pending = False

    def _schedule_new_groups(self, optimizer, scheduler) -> None:
        """Give groups a stock LambdaLR does not know yet their own warmup (RestartWarmupScheduler needs none)."""
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if optimizer is None or isinstance(scheduler, RestartWarmupScheduler) or lambdas is None:
            return
        for group in optimizer.param_groups[len(lambdas):]:
            if self.config.restart_warmup:
                fn = RestartWarmupLambda(group.get(START_KEY, 0), self.config.warmup_steps, self.allocator.total_steps)
            else:
                fn = lambdas[0]
            lambdas.append(fn)
            scheduler.base_lrs.append(group["initial_lr"])
            group["lr"] = group["initial_lr"] * fn(scheduler.last_epoch)


def loss_scale(optimizer) -> float:
    """The fp16 loss scale of this step's backward (Accelerate keeps its GradScaler on the optimizer)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def _ddp_owned_parameters(model: nn.Module) -> list[str]:
    ignored = set(getattr(model, distributed.IGNORE_ATTR, ()))
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in ignored]
