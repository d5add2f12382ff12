"""WindowedShadow: on a run scored on every step, replays windowed scoring beside it.

Both smoothings see the same sensitivities on the same trajectory: the every-step one on every step
(what the run uses), the windowed one only on the steps RankAllocator would score with
``score_every_step=False``. At each growth step the two choices are compared; the every-step choice
is also checked against what the run actually grew, so the replay is known to be faithful.
"""
from __future__ import annotations

from transformers import TrainerCallback

from increlora import increlora_layers
from increlora.allocator import choose_modules
from increlora.importance import ImportanceTracker, sensitivity
from increlora.schedule import plan_growth


class WindowedShadow(TrainerCallback):
    def __init__(self):
        self.decisions: list[dict] = []
        self.replay_mismatches = 0
        self._pending: dict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.layers = dict(increlora_layers(model))
        self.names = list(self.layers)
        config = model.increlora_config
        if not config.score_every_step:
            raise ValueError("WindowedShadow needs a run with score_every_step=True")
        self.plan = plan_growth(config, len(self.names), state.max_steps)
        self.config = config = self.plan.config(config)  # derived schedule fields filled in, as the run's
        self.window = config.effective_score_window
        self.every = ImportanceTracker(self.names, config.beta1, config.beta2)
        self.windowed = ImportanceTracker(self.names, config.beta1, config.beta2)

    def _windowed_scores(self, step: int) -> bool:
        """RankAllocator.is_scoring_step without score_every_step (the budget check is the caller's)."""
        return any(0 <= g - step < self.window for g in self.plan.steps)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # runs before IncreLoraCallback's (user callbacks come first), so grad_acc is this step's
        step = state.global_step
        left = self.plan.budget - sum(layer.active_rank for layer in self.layers.values())
        if left <= 0:
            return
        s = {n: sensitivity(layer) for n, layer in self.layers.items()}
        for n, v in s.items():
            self.every.update(n, v)
            if self._windowed_scores(step):
                self.windowed.update(n, v)
        if step in self.plan.steps:
            a = choose_modules(self.every.scores(), self.names, self.config.top_h, self.config.add_rank, left)
            b = choose_modules(self.windowed.scores(), self.names, self.config.top_h, self.config.add_rank, left)
            self._pending = {"step": step, "every": sorted(n for n, _ in a), "windowed": sorted(n for n, _ in b),
                             "ranks": {n: layer.active_rank for n, layer in self.layers.items()}}

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is None:
            return
        d, self._pending = self._pending, None
        before = d.pop("ranks")
        grown = sorted(n for n, layer in self.layers.items() if layer.active_rank > before[n])
        self.replay_mismatches += grown != d["every"]
        d["identical"] = d["every"] == d["windowed"]
        self.decisions.append(d)

    def summary(self) -> dict:
        return {"decisions": len(self.decisions), "identical": sum(d["identical"] for d in self.decisions),
                "replay_mismatches": self.replay_mismatches, "window": self.window, "details": self.decisions}
