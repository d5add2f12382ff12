"""Many tasks on a Ray cluster: one Ray task per adapter, progress and failures reported on the driver.

Each Ray task runs the same `train_task` as a single-machine run, writing the adapter to the same
folder (which every node must see: a shared file system). A failed task does not stop the others;
the driver names it at the end. With --resume a rerun skips finished tasks and continues interrupted
ones from their checkpoints, as on one machine. Ray is optional: `pip install -e .[ray]`.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from increlora.errors import IncreLoraError

from .pipeline import TrainOptions, train_task

logger = logging.getLogger(__name__)

LOCAL = "local"  # --ray without an address: start a cluster on this machine


class RayUnavailableError(IncreLoraError, ImportError):
    """--ray was asked for but Ray is not installed."""


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError("--ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[serve]')") from exc
    return ray


def connect(ray, address: str) -> None:
    """Join the cluster at address ('auto': the one this machine belongs to), or start a local one."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = {"include_dashboard": False, "log_to_driver": False}
    if address == LOCAL:
        ray.init(**kwargs)
    else:
        ray.init(address=address, **kwargs)


class _ReportSteps(TrainerCallback):
    """Sends (task, step, total) to the driver's progress actor every few seconds."""

    def __init__(self, progress, task: str, every: float = 5.0) -> None:
        self.progress, self.task, self.every, self.last = progress, task, every, 0.0

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if now - self.last >= self.every or state.global_step == state.max_steps:
            self.last = now
            self.progress.update.remote(self.task, state.global_step, state.max_steps)


def _train_one(task: str, output: str, opts: TrainOptions, resume: bool, overwrite: bool, progress) -> dict:
    """Body of one Ray task: a single-machine run of one task."""
    logging.basicConfig(level=logging.INFO, format=f"[{task}] %(message)s")
    result = train_task(task, output, opts, resume=resume, overwrite=overwrite,
                        callbacks=[_ReportSteps(progress, task)])
    # step -1: the task had finished before (skipped with --resume)
    return {"finished": result.finished, "step": result.step, "metrics": result.metrics, "skipped": result.step == -1}


def train_on_ray(jobs: list[tuple[str, Path]], opts: TrainOptions, *, address: str, cpus_per_task: float,
                 gpus_per_task: float, resume: bool, overwrite: bool,
                 report: Callable[[str], None] = print, poll_seconds: float = 2.0) -> dict[str, str]:
    """Train every (task, output) as its own Ray task; returns {task: why} for the tasks that failed.

    `report` gets one line per change of a task's state (started, steps, finished, failed).
    """
    ray = import_ray()
    connect(ray, address)

    @ray.remote
    class Progress:
        def __init__(self) -> None:
            self.steps: dict[str, tuple[int, int]] = {}

        def update(self, task: str, step: int, total: int) -> None:
            self.steps[task] = (step, total)

        def snapshot(self) -> dict[str, tuple[int, int]]:
            return dict(self.steps)

    progress = Progress.options(num_cpus=0).remote()
    remote = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=0)(_train_one)
    pending = {remote.remote(task, str(out), opts, resume, overwrite, progress): task for task, out in jobs}
    report(f"{len(jobs)} tasks submitted to Ray ({cpus_per_task:g} CPU, {gpus_per_task:g} GPU each)")
    failed: dict[str, str] = {}
    shown: dict[str, tuple[int, int]] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll_seconds)
        for ref in ready:
            task = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a task's failure is reported, the others go on
                failed[task] = _first_line(exc)
                report(f"{task}: FAILED: {failed[task]}")
                continue
            if not result["finished"]:
                failed[task] = f"interrupted at step {result['step']}; rerun with --resume"
                report(f"{task}: {failed[task]}")
            else:
                report(f"{task}: done ({'already finished' if result['skipped'] else _scores(result['metrics'])})")
        for task, (step, total) in ray.get(progress.snapshot.remote()).items():
            if task in pending.values() and shown.get(task) != (step, total):
                shown[task] = (step, total)
                report(f"{task}: step {step}/{total}")
    return failed


def _scores(metrics: dict) -> str:
    split = "test" if "test" in metrics else "validation"
    return f"{split} {metrics['main_metric']} {metrics[split]['main']:.4f}"


def _first_line(exc: BaseException) -> str:
    """The task's own error, without Ray's wrapping traceback."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    return f"{type(cause).__name__}: {lines[-1] if lines[0].startswith('ray::') else lines[0]}"
