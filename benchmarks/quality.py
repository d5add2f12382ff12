"""Quality at a matched budget: LoRA (r=2), AdaLoRA (target avg rank 2) and IncreLoRA (avg rank 2).

Every run goes through `increlora-train` (same data, splits, head, loop and step budget); only
--method and --seed change. Finished runs are reused, so an interrupted benchmark continues.

    python benchmarks/quality.py                          # 3 tasks x 3 methods x 3 seeds, MiniLM-L6
    python benchmarks/quality.py --tasks sms_spam --seeds 0 --steps 20 --work /tmp/q
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from training.cli import main as train

METHODS = ("lora", "adalora", "increlora")


def run_args(args, task: str, method: str, seed: int, out: Path) -> list[str]:
    return ["--task", task, "--method", method, "--seed", str(seed), "--output", str(out), "--overwrite",
            "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--no-progress",
            "--save-steps", str(args.steps + 1), "--logging-steps", str(args.steps), "--eval-batch-size", "128",
            "--target-avg-rank", "2", "--init-warmup", str(args.init_warmup), "--interval", str(args.interval),
            "--top-h", str(args.top_h), "--warmup-steps", str(args.warmup_steps)]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: dict) -> str:
    rows = ["| task (test metric) | method | test | validation | trainable params | final total rank | "
            "train time (s) | run time (s) |", "|---|---|---|---|---|---|---|---|"]
    for task, by_method in results.items():
        for method, runs in by_method.items():
            if not runs:
                continue
            m0 = runs[0]
            rows.append(
                f"| {task} ({m0['main_metric']}) | {method} | {mean_std([r['test']['main'] for r in runs])} | "
                f"{mean_std([r['validation']['main'] for r in runs])} | {m0['trainable_parameters']:,} | "
                f"{m0['final_total_rank']} | {statistics.mean(r['train_seconds'] for r in runs):.0f} | "
                f"{statistics.mean(r['wall_seconds'] for r in runs):.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="rotten_tomatoes,sms_spam,bbc_news")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init-warmup", type=int, default=16)
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--top-h", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/increlora_quality"), help="run folders")
    args = ap.parse_args()

    results: dict[str, dict[str, list[dict]]] = {}
    started = time.perf_counter()
    for task in args.tasks.split(","):
        results[task] = {m: [] for m in args.methods.split(",")}
        for seed in map(int, args.seeds.split(",")):
            for method in args.methods.split(","):
                out = args.work / task / method / f"seed{seed}"
                done = out / "metrics.json"
                t0 = time.perf_counter()
                if not done.is_file():
                    code = train(run_args(args, task, method, seed, out))
                    if code != 0:
                        raise SystemExit(f"{task}/{method}/seed{seed} failed with exit code {code}")
                metrics = json.loads(done.read_text())
                metrics.setdefault("wall_seconds", time.perf_counter() - t0)
                done.write_text(json.dumps(metrics, indent=1))
                results[task][method].append(metrics)
                print(f"{task} {method} seed {seed}: test {metrics['main_metric']} {metrics['test']['main']:.4f}, "
                      f"{metrics['train_seconds']:.0f} s train, {metrics['wall_seconds']:.0f} s total", flush=True)
    print(f"\n{args.steps} steps x batch {args.batch_size} x max {args.max_length} tokens, lr {args.lr}, "
          f"model {args.model}; IncreLoRA init_warmup {args.init_warmup}, interval {args.interval}, "
          f"top_h {args.top_h}, warmup {args.warmup_steps}; total {time.perf_counter() - started:.0f} s\n")
    print(table(results))


if __name__ == "__main__":
    main()
