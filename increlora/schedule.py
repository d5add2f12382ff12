"""The schedule of a run: when growth happens (GrowthPlan) and the learning rate with restart warmup.

Growth fires where the authors' code fires it: at step s when ``s > init_warmup and s % interval == 0``
(s the 0-based index of the optimizer step about to be taken), until the rank budget is spent.
``plan_growth`` fills the schedule fields the user left unset from the run's length and budget, so
that growth ends at about a third of the run, as in the official GLUE scripts.

Every optimizer param group has a start step (``group["increlora_start"]``, 0 for groups present
from the beginning). A group's LR warms up linearly over ``warmup_steps`` from its start, then decays
linearly to zero at ``total_steps``. Groups added at growth steps therefore get their own warmup.
Works as the Hugging Face Trainer's scheduler: call ``step()`` after every optimizer step.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .config import IncreLoraConfig
from .errors import ConfigError

START_KEY = "increlora_start"
SCHEDULE_FIELDS = ("init_warmup", "interval", "top_h", "warmup_steps")
# Growth rounds of a derived plan when the run is long enough: the official GLUE scripts at average
# rank 2 grow in 12 to 15 rounds.
TARGET_ROUNDS = 15


def is_growth_step(step: int, init_warmup: int, interval: int) -> bool:
    """The authors' rule: growth at step s > init_warmup with s a multiple of interval."""
    return step > init_warmup and step % interval == 0


def growth_steps(init_warmup: int, interval: int, total_steps: int) -> range:
    """Every step of a run of total_steps at which the growth rule fires (whether or not rank is left)."""
    return range((init_warmup // interval + 1) * interval, total_steps, interval)


@dataclass(frozen=True)
class GrowthPlan:
    """The growth schedule of one run, with the steps at which it adds rank."""

    total_steps: int
    init_warmup: int
    interval: int
    top_h: int
    warmup_steps: int
    start_rank: int  # total active rank before growth
    budget: int  # total active rank at the end
    per_round: int  # components a full round adds (top_h x add_rank)
    steps: tuple[int, ...]  # the growth steps that add rank, in order
    derived: tuple[str, ...]  # schedule fields derived from the run (the rest the user gave)

    @property
    def rounds(self) -> int:
        return len(self.steps)

    @property
    def reaches_budget(self) -> bool:
        return self.start_rank + self.rounds * self.per_round >= self.budget

    @property
    def last_growth(self) -> int | None:
        return self.steps[-1] if self.steps else None

    def describe(self) -> str:
        if self.budget <= self.start_rank:
            growth = "no growth (the budget is the starting rank)"
        elif not self.steps:
            growth = "no growth step falls inside the run"
        else:
            first, last = self.steps[0], self.steps[-1]
            rounds = f"{self.rounds} round{'s' if self.rounds > 1 else ''}"
            growth = (f"{rounds} of up to {self.per_round} components at steps {first}..{last} "
                      f"(every {self.interval}; growth ends at {last / self.total_steps:.0%} of the run)")
        derived = f"; derived from the run: {', '.join(self.derived)}" if self.derived else ""
        return (f"IncreLoRA schedule over {self.total_steps} steps: total rank {self.start_rank} -> {self.budget} "
                f"in {growth}; init_warmup {self.init_warmup}, top_h {self.top_h}, learning-rate warmup "
                f"{self.warmup_steps} steps per parameter group{derived}")

    def config(self, config: IncreLoraConfig) -> IncreLoraConfig:
        """The config with this plan's schedule fields filled in."""
        return dataclasses.replace(config, **{f: getattr(self, f) for f in SCHEDULE_FIELDS})


def plan_growth(config: IncreLoraConfig, num_modules: int, total_steps: int) -> GrowthPlan:
    """The run's growth schedule; schedule fields left None in the config are derived, given ones win.

    Rule for the derived fields (the official GLUE scripts set init_warmup = interval = warmup_steps
    and end growth at about a third of the run):
    - rounds: TARGET_ROUNDS, fewer when the run is too short for rounds at least a score window apart
      (interval >= effective_score_window) before step total_steps / 3;
    - top_h: the fewest modules per round that spend the budget in those rounds;
    - interval: the spacing that puts the last round at about total_steps / 3;
    - init_warmup and warmup_steps: the interval.
    """
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
    if num_modules < 1:
        raise ConfigError(f"num_modules must be >= 1, got {num_modules}")
    c = config
    start = c.init_rank * num_modules
    budget = c.rank_budget(num_modules)
    needed = budget - start
    horizon = total_steps // 3  # growth ends by this step
    window = c.effective_score_window
    top_h, interval, init_warmup = c.top_h, c.interval, c.init_warmup
    if top_h is None:
        if interval is None:
            room = horizon - (init_warmup if init_warmup is not None else window)
            rounds = min(TARGET_ROUNDS, max(1, room // window))
        else:
            first = init_warmup if init_warmup is not None else interval
            rounds = max(1, sum(1 for s in growth_steps(first, interval, total_steps) if s <= horizon))
        top_h = max(1, min(num_modules, math.ceil(needed / (rounds * c.add_rank))))
    rounds = max(0, math.ceil(needed / (top_h * c.add_rank)))
    if interval is None:
        if init_warmup is None:
            interval = max(1, horizon // (rounds + 1))
        else:
            interval = max(1, (horizon - init_warmup) // max(rounds, 1))
    if init_warmup is None:
        init_warmup = interval
    warmup = c.warmup_steps if c.warmup_steps is not None else interval
    steps = tuple(growth_steps(init_warmup, interval, total_steps)[:rounds])
    derived = tuple(f for f in SCHEDULE_FIELDS if getattr(c, f) is None)
    return GrowthPlan(total_steps=total_steps, init_warmup=init_warmup, interval=interval, top_h=top_h,
                      warmup_steps=warmup, start_rank=start, budget=budget, per_round=top_h * c.add_rank,
                      steps=steps, derived=derived)


def restart_warmup_factor(step: int, start: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier of a group that started at `start`, at optimizer step `step` (0-based)."""
    since = step - start
    if since < 0:
        return 0.0
    if since < warmup_steps:
        return since / warmup_steps
    remaining = total_steps - start - warmup_steps
    if remaining <= 0:
        return 0.0 if step >= total_steps else 1.0
    return max(0.0, (total_steps - step) / remaining)


class RestartWarmupScheduler(LRScheduler):
    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, last_epoch: int = -1):
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
        if warmup_steps is None or warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an int >= 0, got {warmup_steps!r} (see GrowthPlan.warmup_steps)")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        for group in optimizer.param_groups:
            group.setdefault(START_KEY, 0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, group: dict, step: int) -> float:
        base = group.get("initial_lr", group["lr"])
        return base * restart_warmup_factor(step, group.get(START_KEY, 0), self.warmup_steps, self.total_steps)

    def get_lr(self) -> list[float]:
        return [self.lr_at(g, self.last_epoch) for g in self.optimizer.param_groups]
