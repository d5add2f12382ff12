"""RankAllocator: scores modules and grows the most important ones until the rank budget is spent.

Call ``step(global_step, optimizer, scheduler)`` once per optimizer step, after backward (and
gradient clipping) and before ``optimizer.step()``. ``global_step`` is the 0-based index of the
optimizer step about to be taken. The growth steps come from the run's ``GrowthPlan`` (schedule
fields left unset in the config are derived from ``total_steps``). The allocator arms the layers'
gradient capture only on the steps whose score can still matter: the last ``score_window`` steps
before each growth step.
Under torch.distributed it keeps the replicas in agreement (see ``increlora.distributed``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from . import distributed
from .config import IncreLoraConfig
from .errors import CheckpointError, ConfigError, TargetModulesError
from .importance import ImportanceTracker, sensitivity
from .layer import IncreLoraLinear
from .model import config_of, increlora_layers
from .schedule import START_KEY, GrowthPlan, growth_steps, is_growth_step, plan_growth

logger = logging.getLogger(__name__)


@dataclass
class GrowthEvent:
    step: int
    module: str
    added: int
    new_rank: int
    score: float


class RankAllocator:
    def __init__(self, model: nn.Module, config: IncreLoraConfig | None = None, total_steps: int = 0,
                 replicas: bool | None = None):
        """``replicas``: whether the processes of an initialised torch.distributed group train copies
        of this model on shares of each batch (data parallel), so they must score and grow as one.
        None (the default) says yes whenever such a group has more than one process; pass False when
        each process trains a model of its own."""
        config = config_of(model, config, "RankAllocator")
        if total_steps < 1:
            raise ConfigError(f"RankAllocator: total_steps must be >= 1, got {total_steps}")
        self.model = model
        self.config = config
        self.total_steps = total_steps
        self.replicas = replicas
        self.layers: dict[str, IncreLoraLinear] = dict(increlora_layers(model))
        if not self.layers:
            raise TargetModulesError("RankAllocator: the model has no IncreLoRA layers; call apply_increlora first")
        self.names = list(self.layers)
        self.plan: GrowthPlan = plan_growth(config, len(self.names), total_steps)
        # the run's config, schedule filled in; the model records it so a saved adapter says how it grew
        self.config = config = self.plan.config(config)
        model.increlora_config = config
        self.budget = self.plan.budget
        self.tracker = ImportanceTracker(self.names, config.beta1, config.beta2)
        self.history: list[GrowthEvent] = []
        self.scored_steps = 0
        self._warn_if_budget_unreachable()
        self._arm(0)

    @property
    def synced(self) -> bool:
        """Whether this step keeps replicas in agreement (see ``replicas``)."""
        return self.replicas is not False and distributed.is_distributed()

    # -- schedule ----------------------------------------------------------------------------
    @property
    def total_rank(self) -> int:
        return sum(layer.active_rank for layer in self.layers.values())

    @property
    def finished(self) -> bool:
        return self.total_rank >= self.budget

    def is_growth_step(self, step: int) -> bool:
        return step < self.total_steps and is_growth_step(step, self.config.init_warmup, self.config.interval)

    def next_growth_step(self, step: int) -> int | None:
        """The first growth step at or after `step` (None: none left in the run)."""
        steps = growth_steps(self.config.init_warmup, self.config.interval, self.total_steps)
        k = max(0, -(-(step - steps.start) // steps.step))  # index of the first one at or after step
        return steps[k] if k < len(steps) else None

    def is_scoring_step(self, step: int) -> bool:
        if self.finished or step >= self.total_steps:
            return False
        if self.config.score_every_step:
            return True
        nxt = self.next_growth_step(step)
        return nxt is not None and nxt - step < self.config.effective_score_window

    def _warn_if_budget_unreachable(self) -> None:
        c, plan = self.config, self.plan
        if not plan.reaches_budget:
            reachable = plan.start_rank + plan.rounds * plan.per_round
            logger.warning(
                "IncreLoRA: %d growth steps x top_h %d x add_rank %d reach total rank %d, below the "
                "budget %d in a run of %d steps; lower init_warmup/interval, raise top_h/add_rank, or leave "
                "them unset to derive them from the run",
                plan.rounds, c.top_h, c.add_rank, reachable, self.budget, self.total_steps)

    def _arm(self, step: int) -> None:
        armed = self.is_scoring_step(step)
        for layer in self.layers.values():
            layer.capture_grad = armed
            layer.grad_acc = None

    # -- the step ----------------------------------------------------------------------------
    def step(self, global_step: int, optimizer: Optimizer | None = None, scheduler=None,
             loss_scale: float = 1.0) -> list[GrowthEvent]:
        """Score (on scoring steps), grow (on growth steps), then arm capture for the next step.

        ``loss_scale``: the factor the loss was multiplied by before backward (fp16 loss scaling,
        e.g. ``GradScaler.get_scale()``); the scores are divided by it (they are linear in the
        gradient). A step whose scores are not finite (overflowed captured gradients) is not scored;
        the scaler skips that optimizer step too.
        """
        events: list[GrowthEvent] = []
        if self.is_scoring_step(global_step):
            if self.synced:
                self._average_captured_gradients()
            scores = {name: sensitivity(layer) / loss_scale for name, layer in self.layers.items()}
            if all(math.isfinite(v) for v in scores.values()):
                for name, v in scores.items():
                    self.tracker.update(name, v)
                self.scored_steps += 1
            else:
                logger.info("IncreLoRA: step %d not scored: its gradients overflowed (loss scale %g)",
                            global_step, loss_scale)
        if self.is_growth_step(global_step) and not self.finished:
            events = self._grow(global_step, optimizer, scheduler)
        self._arm(global_step + 1)
        return events

    def _average_captured_gradients(self) -> None:
        """Every replica scores with the gradient of the whole global batch."""
        for layer in self.layers.values():  # one at a time: a coalesced copy would double this memory
            if layer.grad_acc is None:  # no gradient reached it here: this replica contributes zeros
                w = layer.base_layer.weight
                layer.grad_acc = torch.zeros(layer.out_features, layer.in_features, device=w.device)
            distributed.all_reduce_mean([layer.grad_acc])

    def choose(self) -> list[tuple[str, int]]:
        """Modules to grow now and by how much: top_h by score, never past the budget."""
        return choose_modules(self.tracker.scores(), self.names, self.config.top_h, self.config.add_rank,
                              self.budget - self.total_rank)

    def _grow(self, step: int, optimizer: Optimizer | None, scheduler) -> list[GrowthEvent]:
        scores = self.tracker.scores()
        new_params: list[nn.Parameter] = []
        events = []
        chosen = self.choose()
        if self.synced:  # replicas must grow alike even if their scores differ in the last bit
            chosen = distributed.broadcast_object(chosen)
        restarted: list[nn.Parameter] = []  # grow_init="lora": joined reserves' A and B start over
        for name, k in chosen:
            layer = self.layers[name]
            added = layer.grow(k)
            if self.config.grow_init == "lora" and not any(p is layer.lora_A[-1] for p in added):
                restarted += [layer.lora_A[-1], layer.lora_B[-1]]
            new_params += added
            events.append(GrowthEvent(step, name, k, layer.active_rank, scores[name]))
        if self.finished:
            for layer in self.layers.values():
                layer.drop_reserves()
            new_params = [p for p in new_params if p.requires_grad]
            logger.info("IncreLoRA: rank budget %d reached at step %d; reserves dropped", self.budget, step)
        self.history += events
        if self.synced:  # fresh components start from rank 0's random values
            distributed.broadcast_from_first(new_params)
        if optimizer is not None:
            fit_optimizer_state(optimizer)
            if restarted:
                restart_in_new_group(optimizer, restarted)
                new_params = restarted + new_params
            if new_params:
                add_param_group(optimizer, new_params, step if self.config.restart_warmup else 0, scheduler)
        return events

    # -- views -------------------------------------------------------------------------------
    def rank_pattern(self) -> dict[str, int]:
        return {n: layer.active_rank for n, layer in self.layers.items()}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "total_steps": self.total_steps,
            "budget": self.budget,
            "plan": {"init_warmup": self.plan.init_warmup, "interval": self.plan.interval, "top_h": self.plan.top_h,
                     "warmup_steps": self.plan.warmup_steps, "steps": list(self.plan.steps)},
            "tracker": self.tracker.state_dict(),
            "history": [asdict(e) for e in self.history],
            "scored_steps": self.scored_steps,
            "structure": {n: {"blocks": layer.block_sizes,
                              "reserves": layer.reserve_A is not None,
                              "reserves_enabled": layer.reserves_enabled}
                          for n, layer in self.layers.items()},
        }

    def load_state_dict(self, state: dict, next_step: int) -> None:
        """Restore scores, history and every layer's structure (values come from the model state next)."""
        if set(state["structure"]) != set(self.names):
            raise CheckpointError("allocator state is for other modules than this model's IncreLoRA layers")
        self.total_steps = state["total_steps"]
        self.budget = state["budget"]
        self.tracker.load_state_dict(state["tracker"])
        self.history = [GrowthEvent(**e) for e in state["history"]]
        self.scored_steps = state["scored_steps"]
        for name, s in state["structure"].items():
            layer = self.layers[name]
            layer.set_structure(s["blocks"], reserves=s["reserves"])
            if s["reserves"] and not s["reserves_enabled"]:
                layer.drop_reserves()
        self._arm(next_step)


def choose_modules(scores: dict[str, float], names: list[str], top_h: int, add_rank: int,
                   left: int) -> list[tuple[str, int]]:
    """The top_h modules by score (ties to the earlier module), add_rank each, `left` components at most."""
    if not isinstance(top_h, int) or top_h < 1:  # None would slice every module in
        raise ConfigError(f"choose_modules: top_h must be an int >= 1 (derive it with plan_growth), got {top_h!r}")
    order = sorted(range(len(names)), key=lambda i: (-scores[names[i]], i))
    chosen = []
    for i in order[:top_h]:
        if left <= 0:
            break
        k = min(add_rank, left)
        chosen.append((names[i], k))
        left -= k
    return chosen


def add_param_group(optimizer: Optimizer, params: list[nn.Parameter], start: int, scheduler=None) -> dict:
    """Add params as a new group with the base LR of the first group and its own schedule start."""
    first = optimizer.param_groups[0]
    base_lr = first.get("initial_lr", first["lr"])
    group = {k: v for k, v in first.items() if k not in ("params", "lr", "initial_lr", START_KEY)}
    group.update(params=params, initial_lr=base_lr, lr=base_lr, **{START_KEY: start})
    optimizer.add_param_group(group)
    added = optimizer.param_groups[-1]
    if scheduler is not None and hasattr(scheduler, "lr_at"):
        added["lr"] = scheduler.lr_at(added, scheduler.last_epoch)
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs.append(base_lr)
    return added


def restart_in_new_group(optimizer: Optimizer, params: list[nn.Parameter]) -> None:
    """Forget params' optimizer state and take them out of their groups (add_param_group puts them in the
    step's new group next): Adam's moments from reserve_e-scaled gradients would overstep at e = 1."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    for p in params:
        optimizer.state.pop(p, None)


def fit_optimizer_state(optimizer: Optimizer) -> None:
    """Slice optimizer state tensors to their parameter's shape after a reserve shrank in place."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, t in list(state.items()):
                if torch.is_tensor(t) and t.dim() == p.dim() and t.shape != p.shape:
                    state[key] = t[tuple(slice(0, s) for s in p.shape)].clone()
