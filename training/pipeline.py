"""Train one task end to end: data, backbone, method, Trainer, evaluation, and the output folder.

    <output>/adapter_config.json, adapter_model.safetensors   the adapter (this project's format)
    <output>/metrics.json        validation and test metrics, parameters, final rank, times
    <output>/rank_pattern.json   final rank per module
    <output>/ranks_heatmap.png   final ranks, layers x module types
    <output>/rank_growth.png     total and per-module rank over the steps (IncreLoRA)
    <output>/train_log.json      the Trainer's log history
    <output>/peft/               the PEFT adapter (LoRA / AdaLoRA baselines)
    <output>/checkpoints/        while training only: the checkpoint to resume from
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments

from increlora import IncreLoraConfig
from increlora.assets import resolve_model
from increlora.errors import CheckpointError, ConfigError
from increlora.schedule import plan_growth

from . import methods
from .checkpoints import last_complete_checkpoint
from .data import TaskData
from .interrupt import StopOnInterrupt
from .kinds import kind_of
from .outputs import write_outputs
from .precision import resolve_precision
from .tasks import load_task

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SUBSET_SEED = 0  # the shuffle that picks --max-train-examples, independent of --seed
RUN_FILE = "run.json"
ELAPSED_FILE = "elapsed.json"
# Options that must not change between a run and its resumption.
SAME_ON_RESUME = ("method", "task_type", "model", "seed", "max_length", "max_train_examples", "batch_size",
                  "grad_accum", "epochs", "steps",
                  "learning_rate", "head_lr_scale", "weight_decay", "increlora", "processes", "precision")


@dataclass
class TrainOptions:
    model: str | None = None
    method: str = "increlora"
    task_type: str | None = None  # None: the registered task's kind; sequence classification for --train files
    seed: int = 42
    max_length: int = 128
    max_train_examples: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum: int = 1
    epochs: float = 3.0
    steps: int | None = None
    learning_rate: float = 5e-4
    head_lr_scale: float | None = None  # the head's rate over learning_rate; None: the kind's HEAD_LR_SCALE
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_steps: int | None = None
    save_steps: int = 200
    logging_steps: int = 50
    precision: str = "auto"  # fp32, bf16, fp16 or auto (training/precision.py); run files record the one used
    progress: bool = True
    glue_dir: str | None = None
    conll_dir: str | None = None
    cache_dir: str | None = None
    local: dict = field(default_factory=dict)
    increlora: IncreLoraConfig = field(default_factory=IncreLoraConfig)


@dataclass
class TaskResult:
    task: str
    output: Path
    finished: bool
    step: int
    metrics: dict | None = None


def recorded_model_name(model: str | None) -> str:
    """What the adapter records as its base model: something resolve_model maps back to it."""
    if model is None or model == "default":
        return "default"
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def is_finished(output: Path) -> bool:
    return (output / "metrics.json").is_file() and not (output / CHECKPOINTS).exists()


def check_output(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a used folder unless resuming (a checkpoint is there) or overwriting."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if not output.is_dir():
        raise ConfigError(f"output {output} exists and is not a folder")
    if resume and (output / CHECKPOINTS).is_dir():
        return
    if resume and is_finished(output):
        return
    if overwrite:
        return
    hint = " (no checkpoint there to resume)" if resume else "; pass --overwrite to replace it or --resume to continue"
    raise ConfigError(f"output folder {output} already exists and is not empty{hint}")


def launched_processes() -> int:
    """Processes of this launch (torchrun sets WORLD_SIZE; a plain run is one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def total_steps(opts: TrainOptions, num_train: int) -> int:
    """Optimizer steps of the run, as the Trainer counts them (steps, or epochs x steps per epoch)."""
    if opts.steps:
        return opts.steps
    world = launched_processes()
    per_epoch = max(1, math.ceil(math.ceil(num_train / (opts.batch_size * world)) / opts.grad_accum))
    return max(1, math.ceil(opts.epochs * per_epoch))


def cpu_processes() -> bool:
    """A torchrun launch on a machine without CUDA: the Trainer must be told, or each process trains alone."""
    return launched_processes() > 1 and not torch.cuda.is_available()


def load_backbone(opts: TrainOptions, data: TaskData):
    d = data.definition
    path = resolve_model(opts.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(opts.seed)  # the head's initialisation
        model = kind_of(d.task_type).load_model(path, d)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"could not load model {opts.model or 'default'!r} from {path}: {first}") from exc
    limit = position_limit(tokenizer, model)
    if limit is not None and opts.max_length > limit:
        raise ConfigError(f"--max-length {opts.max_length} is more than model {opts.model or 'default'!r} takes "
                          f"({limit} tokens); use --max-length {limit} or less")
    return tokenizer, model


def position_limit(tokenizer, model) -> int | None:
    """The most tokens the model takes: its absolute position embeddings, or its tokenizer's limit if lower.

    Models with relative or rotary positions only (DeBERTa-v2/v3) take longer inputs than
    max_position_embeddings; only their tokenizer's limit counts.
    """
    config = model.config
    relative = (getattr(config, "position_biased_input", True) is False
                or any(k in str(getattr(config, "position_embedding_type", "absolute"))
                       for k in ("relative", "rotary")))
    limits = [None if relative else getattr(config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]  # tokenizers without one say 1e30
    return min(limits) if limits else None


def training_arguments(opts: TrainOptions, output: Path, steps: int, warmup_steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output / CHECKPOINTS), max_steps=steps, per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.eval_batch_size, gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.learning_rate, weight_decay=opts.weight_decay, max_grad_norm=opts.max_grad_norm,
        lr_scheduler_type="linear", warmup_steps=warmup_steps,
        eval_strategy="steps" if opts.eval_steps else "no", eval_steps=opts.eval_steps,
        save_strategy="steps", save_steps=opts.save_steps, save_total_limit=1,
        logging_strategy="steps", logging_steps=opts.logging_steps,
        seed=opts.seed, data_seed=opts.seed, bf16=opts.precision == "bf16", fp16=opts.precision == "fp16",
        report_to="none", push_to_hub=False, disable_tqdm=not opts.progress, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # bf16 on a machine without CUDA: autocast on the CPU, which the Trainer does only when told
        use_cpu=cpu_processes() or (opts.precision == "bf16" and not torch.cuda.is_available()),
        ddp_find_unused_parameters=False)  # every parameter DDP owns (the head) is used in every forward


def _resumed_options(task: str, run_file: Path, opts: TrainOptions, checkpoint: str) -> TrainOptions:
    """opts with precision "auto" taken from the interrupted run; refused if any of SAME_ON_RESUME differs."""
    saved = json.loads(run_file.read_text())
    # run files written before it was recorded: the Trainer saves one RNG file per process when there are several
    saved.setdefault("processes", len(list(Path(checkpoint).glob("rng_state_*.pth"))) or 1)
    opts = replace(opts, precision=resolve_precision(opts.precision, task, resumed=saved.get("precision")))
    now = _run_record(opts)
    changed = [k for k in SAME_ON_RESUME if saved.get(k) != now.get(k)]
    if changed:
        raise CheckpointError(f"--resume with other options than the interrupted run: {', '.join(changed)} "
                              f"differ (see {run_file})")
    return opts


def _run_record(opts: TrainOptions) -> dict:
    """What run.json keeps: the options, and the number of processes (the global batch depends on it)."""
    return {**_jsonable(opts), "processes": launched_processes()}


def _jsonable(opts: TrainOptions) -> dict:
    return json.loads(json.dumps(asdict(opts), default=str))


def resume_point(task: str, output: Path, opts: TrainOptions, resume: bool) -> tuple[str | None, TrainOptions]:
    """The checkpoint to continue from (None: start afresh), and opts with the precision resolved."""
    folder = output / CHECKPOINTS
    checkpoint = last_complete_checkpoint(folder, opts.method) if resume and folder.is_dir() else None
    if checkpoint is not None:
        return checkpoint, _resumed_options(task, folder / RUN_FILE, opts, checkpoint)
    if resume and folder.is_dir():
        if any(folder.glob("checkpoint-*")):  # every save there was cut off
            raise CheckpointError(f"--resume: no complete checkpoint in {folder}; rerun with --overwrite to start over")
        # stopped (e.g. killed) before its first save: nothing to keep
        logger.info("%s: the run in %s stopped before its first checkpoint; starting from step 0", task, output)
    elif resume:
        logger.info("%s: nothing to resume in %s; starting", task, output)
    return None, replace(opts, precision=resolve_precision(opts.precision, task))


class TrainTime(TrainerCallback):
    """Training time so far, written into every checkpoint: a run killed without warning resumes with
    the time its checkpoint took to reach, not only the time since the resume."""

    def __init__(self, earlier: float):
        self.earlier, self.started = earlier, time.perf_counter()

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    def on_save(self, args, state, control, **kwargs):
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and saved.is_dir():
            (saved / ELAPSED_FILE).write_text(json.dumps({"train_seconds": self.seconds()}))


def earlier_train_seconds(task: str, checkpoint: str | None) -> float:
    """The training time recorded up to `checkpoint` (0 for a fresh start)."""
    if checkpoint is None:
        return 0.0
    try:  # absent in an older version's checkpoint; cut off if the process was killed while writing it
        return float(json.loads((Path(checkpoint) / ELAPSED_FILE).read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s: %s has no readable record of its training time; train_seconds counts from the "
                       "resume only", task, checkpoint)
        return 0.0


def limit_training_examples(data: TaskData, n: int) -> None:
    """Keep n training examples (a low-resource run): the first n in a fixed shuffle, the same for every
    seed and method (a split stored by class, like bbc_news's, would lose whole classes to a plain cut)."""
    rows = data.splits["train"]
    if n < len(rows):
        keep = sorted(random.Random(SUBSET_SEED).sample(range(len(rows)), n))
        rows = [rows[i] for i in keep]
    kind_of(data.definition.task_type).check_train(data.definition, rows)
    data.splits["train"] = rows


def evaluate(trainer, data: TaskData, datasets: dict) -> dict[str, dict]:
    """Metrics of the final model on validation and the task's test splits."""
    d = data.definition
    kind = kind_of(d.task_type)
    names = ["validation", *(s for s in d.test_splits if s in datasets)]
    out, trainer.compute_metrics = {}, None  # the Trainer's own is bound to the validation rows
    for n in names:
        p = trainer.predict(datasets[n])
        out[n] = kind.compute_metrics(d, p.predictions, p.label_ids, data.splits[n])
    return out


def train_task(task: str, output: str | os.PathLike, opts: TrainOptions, *, resume: bool = False,
               overwrite: bool = False, callbacks: list | None = None) -> TaskResult:
    """Train `task` into `output`; returns unfinished (with the step) when interrupted by Ctrl-C."""
    output = Path(output)
    # one process, or one of a torchrun launch (the Trainer's group; HF's default ddp_timeout of 30 min)
    procs = PartialState(cpu=cpu_processes(), timeout=timedelta(seconds=1800))
    check_output(output, resume, overwrite)
    if resume and is_finished(output):
        logger.info("%s: already trained in %s; skipping", task, output)
        return TaskResult(task, output, True, -1, json.loads((output / "metrics.json").read_text()))
    checkpoint, opts = resume_point(task, output, opts, resume)  # from here on, opts.precision is never "auto"

    with procs.main_process_first():  # downloads and caches once
        data = load_task(task, glue_dir=opts.glue_dir, cache_dir=opts.cache_dir, conll_dir=opts.conll_dir,
                         task_type=opts.task_type, **opts.local)
        tokenizer, model = load_backbone(opts, data)
    d = data.definition
    kind = kind_of(d.task_type)
    config = kind.adjust_config(opts.increlora)  # e.g. an embedding has no head to train in full
    if opts.max_train_examples is not None:
        limit_training_examples(data, opts.max_train_examples)
    datasets = {name: kind.to_dataset(d, rows, tokenizer, opts.max_length) for name, rows in data.splits.items()}
    steps = total_steps(opts, len(datasets["train"]))
    # the schedule fields left unset are derived from the run (IncreLoRA's allocator logs the plan as
    # training starts); every method gets the same learning-rate warmup (IncreLoraTrainer schedules its own)
    targets, _ = methods.targets_of(model, config)
    plan = plan_growth(config, len(targets), steps)
    prepared = methods.prepare(opts.method, model, config, steps)
    # --overwrite clears the folder only now that data and model loaded: a rerun that fails on its
    # inputs keeps the adapter that was there
    procs.wait_for_everyone()  # every process has checked the folder before the first one changes it
    if checkpoint is None and overwrite and output.exists() and procs.is_main_process:
        shutil.rmtree(output)
    procs.wait_for_everyone()

    folder = output / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    if procs.is_main_process:
        (folder / RUN_FILE).write_text(json.dumps(_run_record(opts), indent=1))
    stop = StopOnInterrupt()
    trainer_kwargs = {"increlora_config": config} if opts.method == "increlora" else {}
    trainer_kwargs["head_lr_scale"] = kind.HEAD_LR_SCALE if opts.head_lr_scale is None else opts.head_lr_scale
    trainer = prepared.trainer_cls(
        model=prepared.model,
        args=training_arguments(opts, output, steps, 0 if opts.method == "increlora" else plan.warmup_steps),
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"], data_collator=kind.collator(tokenizer),
        compute_metrics=lambda p: kind.compute_metrics(d, p.predictions, p.label_ids, data.splits["validation"]),
        callbacks=[*(callbacks or []), *prepared.callbacks, stop], **trainer_kwargs)

    clock = TrainTime(earlier_train_seconds(task, checkpoint))
    trainer.add_callback(clock)
    with stop:
        trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = clock.seconds()
    if trainer.state.global_step < steps:
        return TaskResult(task, output, False, trainer.state.global_step)

    started = time.perf_counter()
    results = evaluate(trainer, data, datasets)
    eval_seconds = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        return TaskResult(task, output, True, steps, None)
    methods.save(prepared, output, task=d.name, base_model=recorded_model_name(opts.model),
                 kind_fields=kind.adapter_fields(d, resolve_model(opts.model)),
                 metadata={"method": opts.method, "seed": opts.seed, "max_length": opts.max_length})
    metrics = write_outputs(
        output, prepared, trainer, results, task=d.name, main_metric=d.main_metric,
        base_model=recorded_model_name(opts.model), options=_jsonable(opts),
        times={"train_seconds": round(train_seconds, 2), "eval_seconds": round(eval_seconds, 2)},
        resumed_from_step=int(Path(checkpoint).name.split("-")[-1]) if checkpoint else None)
    shutil.rmtree(folder, ignore_errors=True)
    return TaskResult(task, output, True, steps, metrics)
