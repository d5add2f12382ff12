"""Quality of the other kinds at a matched budget (average rank 2): IncreLoRA against LoRA r=2 on MiniLM-L6.

    bbc_retrieval  embedding: MRR@10, recall@1/10; also the untouched backbone (MiniLM is an embedding model)
    wnut16         token classification: entity F1 (seqeval)
    bbc_rerank     reranking (pair classifier): MRR@10, NDCG@10; also the base bi-encoder's cosine

Each method's learning rate is chosen on validation from the task's grid at the first seed; the
chosen rate then runs with the other seeds; the table reports test mean and std over the seeds run.
Every run is a subprocess of `python -m training.cli --resume` writing into --work; a finished run
is reused and a killed one resumes, so the benchmark continues where it stopped.

    python benchmarks/quality_kinds.py                 # everything, in order; resumable
    python benchmarks/quality_kinds.py --report        # the table from the runs so far
    python benchmarks/quality_kinds.py --smoke         # every path once, on a tiny random model (a minute)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for training and increlora when run as a script from a checkout
METHODS = ("increlora", "lora")
# task -> (steps, max_length, learning-rate grid); batch 16 everywhere
TASKS = {"bbc_retrieval": (80, 64, (5e-4, 2e-3)),
         "wnut16": (240, 64, (1e-3, 3e-3)),
         "bbc_rerank": (80, 64, (5e-4, 2e-3))}
SEEDS = (42, 43, 44)


def run_dir(work: Path, task: str, method: str, lr: float, seed: int) -> Path:
    return work / task / f"{method}-lr{lr:g}-s{seed}"


def train(args, task: str, method: str, lr: float, seed: int) -> dict | None:
    steps, max_length, _ = TASKS[task]
    out = run_dir(args.work, task, method, lr, seed)
    argv = [sys.executable, "-m", "training.cli", "--task", task, "--method", method, "--seed", str(seed),
            "--lr", repr(lr), "--output", str(out), "--model", args.model, "--steps", str(args.steps or steps),
            "--batch-size", "16", "--eval-batch-size", "64", "--max-length", str(args.max_length or max_length),
            "--target-avg-rank", "2", "--save-steps", "40", "--logging-steps", "20", "--no-progress", "--resume",
            "--fp32"]  # as the recorded runs, whatever the CPU's default precision
    if args.max_train_examples:
        argv += ["--max-train-examples", str(args.max_train_examples)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "a") as log:
        code = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        print(f"FAILED ({code}): {task} {method} lr {lr:g} seed {seed}; see {out.parent / out.name}.log", flush=True)
        return None
    return json.loads((out / "metrics.json").read_text())


def finished(args, task, method, lr, seed) -> dict | None:
    path = run_dir(args.work, task, method, lr, seed) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def chosen_lr(args, task: str, method: str) -> float | None:
    """The grid's rate with the best validation score at the first seed (None until the grid is done)."""
    scores = {lr: finished(args, task, method, lr, SEEDS[0]) for lr in TASKS[task][2]}
    if any(m is None for m in scores.values()):
        return None
    return max(scores, key=lambda lr: scores[lr]["validation"]["main"])


def baseline(args, task: str) -> dict:
    """The untouched backbone's embeddings: retrieval for bbc_retrieval, cosine ranking for bbc_rerank."""
    cache = args.work / task / "baseline.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from transformers import AutoTokenizer

    from increlora.assets import resolve_model
    from training.kinds import embedding
    from training.metrics import ranking_metrics
    from training.tasks import get_definition, load_task

    path = resolve_model(args.model)
    data = load_task(task)
    model = embedding.load_model(path, embedding.definition(task, scored=False))
    tok = AutoTokenizer.from_pretrained(path)
    max_length = args.max_length or TASKS[task][1]
    out = {}
    for split in ("validation", "test"):
        rows = data.splits[split]
        texts = list(dict.fromkeys(t for e in rows for t in (e.text, e.text_pair)))  # each text once
        vectors = dict(zip(texts, embedding.encode_texts(model, tok, texts, max_length)))
        a, p = (np.stack([vectors[getattr(e, side)] for e in rows]) for side in ("text", "text_pair"))
        if task == "bbc_retrieval":
            out[split] = embedding.retrieval_metrics(a, p, [e.text_pair for e in rows])
        else:
            cos = (a * p).sum(1) / ((a * a).sum(1) * (p * p).sum(1)) ** 0.5
            out[split] = ranking_metrics(get_definition(task), cos[:, None], [e.label for e in rows],
                                         [e.group for e in rows])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1))
    return out


def jobs(args) -> list[tuple]:
    """The grid at the first seed, then the chosen rates at the other seeds (known once the grid is done)."""
    todo = [(t, m, lr, SEEDS[0]) for t in args.tasks for lr in TASKS[t][2] for m in args.methods]
    return todo


def run_all(args) -> None:
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda j: train(args, *j), jobs(args)))
        for task in args.tasks:
            if task in ("bbc_retrieval", "bbc_rerank"):
                baseline(args, task)
        later = [(t, m, chosen_lr(args, t, m), s) for t in args.tasks for m in args.methods for s in args.seeds[1:]]
        list(pool.map(lambda j: train(args, *j), [j for j in later if j[2] is not None]))


def report(args) -> str:
    lines = ["| task | method | validation at seed 42, per rate | lr chosen | seeds | test main | "
             "test metrics (mean over seeds) |", "|---|---|---|---|---|---|---|"]
    for task in args.tasks:
        if (args.work / task / "baseline.json").is_file():
            b = baseline(args, task)["test"]
            name = "untouched backbone" if task == "bbc_retrieval" else "base bi-encoder cosine"
            lines.append(f"| {task} | {name} | {next(iter(baseline(args, task)['validation'].values())):.4f} | - | - "
                         f"| {next(iter(b.values())):.4f} | "
                         + ", ".join(f"{k} {v:.4f}" for k, v in b.items() if k not in ("main", "combined")) + " |")
        for method in args.methods:
            lr = chosen_lr(args, task, method)
            if lr is None:
                continue
            runs = [m for s in SEEDS if (m := finished(args, task, method, lr, s)) is not None]
            mains = [m["test"]["main"] for m in runs]
            std = f" ± {statistics.stdev(mains):.4f}" if len(mains) > 1 else ""
            keys = [k for k in runs[0]["test"] if k not in ("main", "combined")]
            metrics = ", ".join(f"{k} {statistics.mean(m['test'][k] for m in runs):.4f}" for k in keys)
            grid = ", ".join(f"{r:g}: {finished(args, task, method, r, SEEDS[0])['validation']['main']:.4f}"
                             for r in TASKS[task][2])
            lines.append(f"| {task} | {method} | {grid} | {lr:g} | {len(runs)} | {statistics.mean(mains):.4f}{std} "
                         f"| {metrics} |")
    return "\n".join(lines)


def tiny_model(folder: Path) -> str:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer: the smoke run's backbone."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from increlora.assets import resolve_model

    minilm = Path(resolve_model("default"))
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, folder / name)
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "quality_kinds")
    ap.add_argument("--model", default="default")
    ap.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=list(SEEDS))
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (one thread each)")
    ap.add_argument("--steps", type=int, default=None, help="override the tasks' steps")
    ap.add_argument("--max-length", type=int, default=None, help="override the tasks' max length")
    ap.add_argument("--max-train-examples", type=int, default=None)
    ap.add_argument("--lrs", type=lambda s: tuple(float(x) for x in s.split(",")), default=None,
                    help="override the tasks' learning-rate grids")
    ap.add_argument("--report", action="store_true", help="print the table from the runs so far")
    ap.add_argument("--smoke", action="store_true", help="every path once on a tiny random model")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.lrs:
        for task, (steps, length, _) in list(TASKS.items()):
            TASKS[task] = (steps, length, args.lrs)
    if args.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="quality-kinds-smoke-")
        args.work, args.model = Path(tmp.name) / "runs", tiny_model(Path(tmp.name) / "model")
        args.steps, args.max_length, args.max_train_examples, args.seeds = 2, 32, 32, args.seeds[:1]
        for task, (steps, length, lrs) in list(TASKS.items()):
            TASKS[task] = (steps, length, lrs[:1])
    if not args.report:
        run_all(args)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
