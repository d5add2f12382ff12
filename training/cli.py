"""increlora-train: train IncreLoRA (or LoRA / AdaLoRA baseline) adapters, one per task.

    increlora-train --task rotten_tomatoes --output adapters/rotten_tomatoes
    increlora-train --tasks rotten_tomatoes,sms_spam,bbc_news --output adapters/
    increlora-train --task sst2 --model microsoft/deberta-v3-base --target-avg-rank 2 --output ...
    increlora-train --task my_reviews --train data/train.csv --validation data/dev.csv --output ...
    increlora-train --tasks a,b,c --output /shared/adapters --ray auto     # one Ray task per task
    increlora-train --task bbc_retrieval --output adapters/bbc_retrieval    # an embedding task
    increlora-train --task-type embedding --task faq --train pairs.csv --output ...  # anchor,positive[,negative]
    increlora-train --task-type token-classification --task ner --train ner.jsonl --output ...  # tokens, tags

Every IncreLoraConfig field is an option (defaults from the paper). Ctrl-C writes a checkpoint;
rerun the same command with --resume to continue.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from pathlib import Path

from increlora import IncreLoraConfig
from increlora.config import GROW_INITS, INITS, RANK_SCALINGS
from increlora.errors import IncreLoraError

from .kinds import TASK_TYPES
from .methods import METHODS
from .pipeline import TrainOptions, check_output, train_task
from .tasks import known_tasks

PROG = "increlora-train"
EXIT_INTERRUPTED = 130


class CliError(IncreLoraError):
    """A bad command line the parser could not catch (printed as one line)."""


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _target_modules(value: str) -> list[str] | str:
    return value[3:] if value.startswith("re:") else _names(value)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per IncreLoraConfig field, typed from its default, with the field's help text."""
    group = parser.add_argument_group("IncreLoRA (defaults from the paper)")
    helps = IncreLoraConfig.field_help()
    for f in dataclasses.fields(IncreLoraConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = helps[f.name].replace("%", "%%")  # the formatter appends the default
        kw: dict = {"dest": f"cfg_{f.name}", "default": default, "help": text}
        if f.name == "target_modules":
            kw.update(type=_target_modules, metavar="A,B,...|re:REGEX")
        elif f.name == "modules_to_save":
            kw.update(type=_names, metavar="A,B,...")
        elif f.name == "rank_scaling":
            kw.update(choices=RANK_SCALINGS)
        elif f.name == "init":
            kw.update(choices=INITS)
        elif f.name == "grow_init":
            kw.update(choices=GROW_INITS)
        elif isinstance(default, bool):
            kw.update(action=argparse.BooleanOptionalAction)
        elif "int" in str(f.type) and "float" not in str(f.type):
            kw.update(type=int, metavar="N")
        else:
            kw.update(type=float, metavar="X")
        group.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help=f"one task: {', '.join(known_tasks())}, or a name for --train files")
    which.add_argument("--tasks", type=_names, help="comma-separated tasks, each written to OUTPUT/<task>")
    p.add_argument("--output", required=True, type=Path,
                   help="adapter folder (--task) or parent folder of one adapter folder per task (--tasks)")
    p.add_argument("--model", default="default",
                   help="backbone: a Hugging Face id or local folder; 'default' is the embedded all-MiniLM-L6-v2")
    p.add_argument("--method", choices=METHODS, default="increlora",
                   help="IncreLoRA, or a PEFT baseline at the same rank budget")

    p.add_argument("--task-type", choices=TASK_TYPES, default=None,
                   help="kind of task: with --train, how the files are read (default sequence-classification); "
                        "a registered task has its own kind")
    data = p.add_argument_group("data")
    data.add_argument("--train", help="local training file (.csv, .tsv, .jsonl with a header/keys)")
    data.add_argument("--validation", help="local validation file; without it, 10%% of --train")
    data.add_argument("--test", help="local test file (optional)")
    data.add_argument("--text-column", default="text", help="text column of sequence-classification files")
    data.add_argument("--text-pair-column", default=None, help="second text column, for sentence pairs")
    data.add_argument("--label-column", default="label", help="label column of sequence-classification files")
    data.add_argument("--problem-type", choices=("single_label_classification", "regression"), default=None,
                      help="local files: classes (default) or a regression score")
    data.add_argument("--glue-dir", help="folder in the official GLUE layout (else GLUE comes through `datasets`)")
    data.add_argument("--conll-dir", help="folder with the CoNLL-2003 files (eng.train/eng.testa/eng.testb or "
                                           "train.txt/valid.txt/test.txt), for task conll2003")
    data.add_argument("--cache-dir",
                      help="cache of the embedded model and data; without it, $INCRELORA_HOME or ~/.cache/increlora")
    data.add_argument("--max-length", type=int, default=128, help="max tokens per example (longer ones are cut)")
    data.add_argument("--max-train-examples", type=int, default=None, metavar="N",
                      help="train on N training examples only (a low-resource run: the first N in a fixed "
                           "shuffle, the same for every seed and method); validation and test stay whole")

    run = p.add_argument_group("training")
    run.add_argument("--seed", type=int, default=42, help="seed of the head, adapter init, data order, dropout")
    run.add_argument("--batch-size", type=int, default=32, help="per device")
    run.add_argument("--eval-batch-size", type=int, default=64, help="per device")
    run.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    run.add_argument("--epochs", type=float, default=3.0, help="passes over the training data")
    run.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    run.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=5e-4,
                     help="peak learning rate")
    run.add_argument("--head-lr-scale", type=float, default=None,
                     help="learning rate of the modules trained in full (the head) as a multiple of --lr "
                          "(default: the kind's: 10 for token classification, else 1)")
    run.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    run.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    run.add_argument("--eval-steps", type=int, default=None, help="evaluate on validation every N steps")
    run.add_argument("--save-steps", type=int, default=200, help="write a checkpoint every N steps")
    run.add_argument("--logging-steps", type=int, default=50, help="log the loss every N steps")
    prec = run.add_mutually_exclusive_group()
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16", default="auto",
                      help="bfloat16 autocast (default on a CPU with native bfloat16: AVX512-BF16 or AMX; "
                           "elsewhere float32; --resume keeps the interrupted run's precision)")
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="float16 mixed precision")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                      help="float32 throughout, also where bfloat16 is the default")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--debug", action="store_true", help="show library logs and full tracebacks")
    cluster = p.add_argument_group("Ray (pip install -e '.[ray]')")
    cluster.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                         help="train each task as a Ray task: on the cluster at ADDRESS ('auto': the one this "
                              "machine belongs to), or on a cluster started here when no address is given; "
                              "every node must see --output")
    cluster.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs Ray gives each task (with --ray)")
    cluster.add_argument("--gpus-per-task", type=float, default=0.0, help="GPUs Ray gives each task (with --ray)")
    add_config_options(p)
    return p


def options_from(args: argparse.Namespace) -> TrainOptions:
    cfg = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    for name in ("steps", "batch_size", "eval_batch_size", "grad_accum", "max_length", "save_steps", "logging_steps",
                 "max_train_examples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.eval_steps is not None and args.eval_steps < 1:
        raise CliError(f"--eval-steps must be >= 1, got {args.eval_steps}")
    if args.epochs <= 0:
        raise CliError(f"--epochs must be > 0, got {args.epochs}")
    if args.head_lr_scale is not None and not args.head_lr_scale > 0:
        raise CliError(f"--head-lr-scale must be > 0, got {args.head_lr_scale}")
    if args.cpus_per_task <= 0 or args.gpus_per_task < 0:
        raise CliError("--cpus-per-task must be > 0 and --gpus-per-task >= 0")
    if args.ray is None and (args.cpus_per_task != 1.0 or args.gpus_per_task != 0.0):
        raise CliError("--cpus-per-task and --gpus-per-task go with --ray")
    local = {}
    if args.train:
        local = {"train": args.train, "validation": args.validation, "test": args.test,
                 "text_column": args.text_column, "text_pair_column": args.text_pair_column,
                 "label_column": args.label_column, "problem_type": args.problem_type}
    elif args.validation or args.test:
        raise CliError("--validation/--test need --train")
    return TrainOptions(
        model=args.model, method=args.method, task_type=args.task_type, seed=args.seed, max_length=args.max_length,
        max_train_examples=args.max_train_examples,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, grad_accum=args.grad_accum,
        epochs=args.epochs, steps=args.steps, learning_rate=args.learning_rate,
        head_lr_scale=args.head_lr_scale, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, eval_steps=args.eval_steps, save_steps=args.save_steps,
        logging_steps=args.logging_steps, precision=args.precision, progress=not args.no_progress,
        glue_dir=args.glue_dir, conll_dir=args.conll_dir, cache_dir=args.cache_dir, local=local,
        increlora=IncreLoraConfig(**cfg))


def plan(args: argparse.Namespace) -> list[tuple[str, Path]]:
    if args.task:
        return [(args.task, args.output)]
    if args.train:
        raise CliError("--train goes with --task (one local task), not --tasks")
    if not args.tasks:
        raise CliError("--tasks is empty")
    return [(t, args.output / t) for t in args.tasks]


def summary(result) -> str:
    m = result.metrics
    scores = f"validation {m['main_metric']} {m['validation']['main']:.4f}"
    if "test" in m:
        scores = f"test {m['main_metric']} {m['test']['main']:.4f} ({scores})"
    return (f"{result.task}: {scores}, "
            f"{m['trainable_parameters']:,} parameters, total rank {m['final_total_rank']}, "
            f"{m['train_seconds']:.0f} s -> {result.output}")


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0] + (" (details with --debug)" if len(lines) > 1 else "")


def _configure_logging(debug: bool) -> None:
    import transformers

    level = logging.DEBUG if debug else logging.INFO
    if int(os.environ.get("RANK", "0")) > 0 and not debug:
        level = logging.WARNING  # under torchrun, the first process reports progress
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    transformers.logging.set_verbosity(transformers.logging.INFO if debug else transformers.logging.ERROR)
    if not debug:
        transformers.logging.disable_progress_bar()  # weight loading/saving bars; the training bar stays
    for name in ("peft", "accelerate", "filelock", "urllib3"):
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.WARNING)
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def run(args: argparse.Namespace, callbacks: list | None = None) -> int:
    opts = options_from(args)
    jobs = plan(args)
    for _, output in jobs:  # fail before any training, not after the first task
        check_output(output, args.resume, args.overwrite)
    if args.ray is not None:
        return run_on_ray(args, opts, jobs)
    for i, (task, output) in enumerate(jobs, 1):
        logging.getLogger(__name__).info("[%d/%d] %s (%s) -> %s", i, len(jobs), task, opts.method, output)
        result = train_task(task, output, opts, resume=args.resume, overwrite=args.overwrite, callbacks=callbacks)
        if not result.finished:
            print(f"{PROG}: interrupted at step {result.step}; checkpoint in {output / 'checkpoints'}; "
                  f"rerun the same command with --resume to continue", file=sys.stderr)
            return EXIT_INTERRUPTED
        if result.metrics is not None:
            print(summary(result), flush=True)
    return 0


def run_on_ray(args: argparse.Namespace, opts, jobs: list[tuple[str, Path]]) -> int:
    from .ray_jobs import train_on_ray

    opts = dataclasses.replace(opts, progress=False)  # the driver reports steps instead of bars
    failed = train_on_ray(jobs, opts, address=args.ray, cpus_per_task=args.cpus_per_task,
                          gpus_per_task=args.gpus_per_task, resume=args.resume, overwrite=args.overwrite,
                          report=lambda line: print(line, flush=True))
    if failed:
        print(f"{PROG}: error: {len(failed)} of {len(jobs)} tasks failed: " +
              "; ".join(f"{task}: {why}" for task, why in failed.items()), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """Entry point of the console script; `callbacks` are extra TrainerCallbacks (for tests and tools)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug)
    try:
        return run(args, callbacks)
    except (IncreLoraError, CliError) as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if args.debug:
            raise
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
