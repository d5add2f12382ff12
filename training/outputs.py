"""What a finished run leaves next to its adapter: metrics.json, rank_pattern.json, the plots, the log."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from . import methods
from .plots import plot_rank_growth, plot_rank_heatmap


def write_outputs(output: Path, prepared: methods.Prepared, trainer, results: dict[str, dict], *, task: str,
                  main_metric: str, base_model: str, options: dict, times: dict,
                  resumed_from_step: int | None) -> dict:
    ranks = methods.final_ranks(prepared)
    (output / "rank_pattern.json").write_text(json.dumps(ranks, indent=1))
    plot_rank_heatmap(ranks, output / "ranks_heatmap.png", title=f"{task}: final ranks ({prepared.method})")
    growth = None
    allocator = getattr(trainer, "allocator", None)
    if allocator is not None:
        history = [asdict(e) for e in allocator.history]
        initial = {n: allocator.config.init_rank for n in ranks}
        plot_rank_growth(initial, history, allocator.total_steps, allocator.budget, output / "rank_growth.png")
        plan = allocator.plan
        growth = {"budget": allocator.budget, "events": history, "scored_steps": allocator.scored_steps,
                  "ended_at_step": history[-1]["step"] if history else None,
                  "plan": {"init_warmup": plan.init_warmup, "interval": plan.interval, "top_h": plan.top_h,
                           "warmup_steps": plan.warmup_steps, "steps": list(plan.steps),
                           "derived": list(plan.derived)}}
    (output / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    metrics = {
        "task": task,
        "method": prepared.method,
        "base_model": base_model,
        "main_metric": main_metric,
        **results,
        "trainable_parameters": methods.trainable_count(prepared),
        "final_total_rank": sum(ranks.values()),
        "num_modules": len(ranks),
        "train_steps": trainer.state.global_step,
        **times,
        "resumed_from_step": resumed_from_step,
        "growth": growth,
        "options": options,
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
